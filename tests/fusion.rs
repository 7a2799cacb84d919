//! AdapterFusion tasks over gRPC: the library's own logits at every drop depth (full and pruned
//! adapter sets), fusion weights equal to the numpy reference's, fan-out with shared adapters equal
//! to each task alone, broken fusion tasks refused by file.

mod common;

use adapterdrop_serve::proto::{
    InferRequest, InferResponse, ListTasksRequest, TaskRef, TaskStatus, Texts, TokenIds, TokenizedInputs, infer_request::Inputs,
};
use common::{TestServer, adapterhub_fixtures, copy_dir, max_abs_diff, test_repo};
use serde_json::Value;

const TOL: f64 = 1e-4;

fn json(path: std::path::PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn request(tasks: &[(&str, Option<u32>)], inputs: Inputs, weights: bool) -> InferRequest {
    InferRequest {
        tasks: tasks.iter().map(|(n, d)| TaskRef { name: n.to_string(), version: None, drop_first: *d, ..Default::default() }).collect(),
        inputs: Some(inputs),
        truncate: false,
        id: String::new(),
        return_fusion_weights: weights,
        ..Default::default()
    }
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// Unpadded token ids of the library fixture's padded texts.
fn fixture_tokens(fx: &Value) -> Inputs {
    let seqs = (0..fx["input_ids"].as_array().unwrap().len())
        .map(|r| {
            let n = ints(&fx["attention_mask"][r]).iter().filter(|m| **m == 1).count();
            TokenIds { input_ids: ints(&fx["input_ids"][r])[..n].to_vec(), attention_mask: vec![1; n], token_type_ids: vec![] }
        })
        .collect();
    Inputs::Tokens(TokenizedInputs { sequences: seqs })
}

fn logits(resp: &InferResponse, task: usize) -> Vec<Vec<f32>> {
    resp.results[task].sequences.iter().map(|s| s.logits.clone()).collect()
}

#[tokio::test]
async fn fusion_and_pruned_fusion_equal_the_library_at_every_drop_depth() {
    let fx = json(adapterhub_fixtures().join("bert-tiny/reference_logits.json"));
    let server = TestServer::start(&[]);
    let mut client = server.client().await;
    let texts = Inputs::Texts(Texts { texts: fx["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().into()).collect() });
    let mut checked = 0;
    for (task, lib) in [("fusion", "fusion:fa,fb,fc"), ("fusion-pruned", "fusion:fa,fc")] {
        for n in 0..=2u32 {
            let want = &fx["logits"][lib][n.to_string()];
            for inputs in [texts.clone(), fixture_tokens(&fx)] {
                let resp = client.infer(request(&[(task, Some(n))], inputs, false)).await.unwrap().into_inner();
                let got = logits(&resp, 0);
                assert_eq!(got.len(), want.as_array().unwrap().len());
                for (r, g) in got.iter().enumerate() {
                    let d = max_abs_diff(g, &floats(&want[r]));
                    assert!(d <= TOL, "{task} n={n} row {r}: max abs {d:e} vs the library");
                }
                assert_eq!(resp.results[0].dropped_layers, (0..n).collect::<Vec<_>>());
                assert!(resp.results[0].fusion_weights.is_empty(), "weights only when asked for");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 12);
}

#[tokio::test]
async fn fusion_weights_equal_the_reference_and_sum_to_one() {
    let exp = json(test_repo().join("expected.json"));
    let server = TestServer::start(&[]);
    let mut client = server.client().await;
    let mut checked = 0;
    for task in ["fusion", "fusion-pruned", "fusion-static"] {
        let spec = &exp["tasks"][task];
        for case in spec["cases"].as_array().unwrap() {
            let seqs: Vec<TokenIds> = (0..case["input_ids"].as_array().unwrap().len())
                .map(|r| TokenIds {
                    input_ids: ints(&case["input_ids"][r]),
                    attention_mask: vec![],
                    token_type_ids: ints(&case["token_type_ids"][r]),
                })
                .collect();
            let tokens: u64 = seqs.iter().map(|s| s.input_ids.len() as u64).sum();
            for (n, want) in case["fusion_weights"].as_object().unwrap() {
                let n: u32 = n.parse().unwrap();
                let inputs = Inputs::Tokens(TokenizedInputs { sequences: seqs.clone() });
                let resp = client.infer(request(&[(task, Some(n))], inputs, true)).await.unwrap().into_inner();
                let got = &resp.results[0].fusion_weights;
                let want = want.as_object().unwrap();
                assert_eq!(got.len(), want.len(), "{task} n={n}: one entry per fusion slot that ran");
                for w in got {
                    assert!(w.layer >= n, "{task}: dropped layer {} reported", w.layer);
                    let key = format!("{}:{}", w.layer, w.location);
                    let names: Vec<&str> = w.adapters.iter().map(String::as_str).collect();
                    let expected_names: Vec<&str> =
                        spec["fusion"]["slots"][&key].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
                    assert_eq!(names, expected_names, "{task} {key}");
                    let d = max_abs_diff(&w.weights, &floats(&want[&key]));
                    assert!(d <= TOL, "{task} n={n} {key}: weights {:?} vs reference {:?}", w.weights, want[&key]);
                    assert!((w.weights.iter().sum::<f32>() - 1.0).abs() < 1e-4);
                    assert_eq!(w.tokens, tokens);
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 20, "only {checked} slot comparisons");
    // A plain adapter task has no fusion weights even when asked.
    let resp = client.infer(request(&[("sent", None)], Inputs::Texts(Texts { texts: vec!["x".into()] }), true)).await.unwrap().into_inner();
    assert!(resp.results[0].fusion_weights.is_empty());
}

#[tokio::test]
async fn fan_out_over_fusions_sharing_adapters_equals_each_alone() {
    let server = TestServer::start(&[]);
    let mut client = server.client().await;
    let texts = Inputs::Texts(Texts { texts: vec!["the plot never comes together.".into(), "a gripping, moving film".into()] });
    let tasks = [
        ("fusion", Some(0)),
        ("fusion-pruned", Some(0)),
        ("fusion", Some(1)),
        ("sent", Some(0)),
        ("fusion-pruned", Some(2)),
        ("fa-plain", Some(0)),
    ];
    let fanned = client.infer(request(&tasks, texts.clone(), true)).await.unwrap().into_inner();
    for (i, t) in tasks.iter().enumerate() {
        let alone = client.infer(request(&[*t], texts.clone(), true)).await.unwrap().into_inner();
        for (g, w) in logits(&fanned, i).iter().zip(logits(&alone, 0)) {
            let d = max_abs_diff(g, &w.iter().map(|v| *v as f64).collect::<Vec<_>>());
            assert!(d <= 1e-5, "{t:?}: fan-out vs alone differ by {d:e}");
        }
        assert_eq!(fanned.results[i].fusion_weights.len(), alone.results[0].fusion_weights.len(), "{t:?}");
        for (a, b) in fanned.results[i].fusion_weights.iter().zip(&alone.results[0].fusion_weights) {
            assert_eq!((a.layer, &a.adapters, a.tokens), (b.layer, &b.adapters, b.tokens));
            let d = max_abs_diff(&a.weights, &b.weights.iter().map(|v| *v as f64).collect::<Vec<_>>());
            assert!(d <= 1e-5, "{t:?}: fusion weights differ by {d:e}");
        }
    }
}

#[tokio::test]
async fn broken_fusion_tasks_are_refused_by_file_and_the_rest_serves() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    copy_dir(&test_repo().join("backbones/bert-tiny"), &repo.join("backbones/bert-tiny"));
    for (t, to) in [
        ("fusion", "fusion"),
        ("fusion-pruned", "fusion-pruned"),
        ("fusion", "no-adapters"),
        ("fusion", "wrong-kind"),
        ("fusion", "up-on-fusion"),
    ] {
        copy_dir(&test_repo().join("tasks").join(t), &repo.join("tasks").join(to));
        let m = repo.join("tasks").join(to).join("1/task.json");
        std::fs::write(&m, std::fs::read_to_string(&m).unwrap().replace(&format!("\"name\": \"{t}\""), &format!("\"name\": \"{to}\"")))
            .unwrap();
    }
    // fusion-pruned: an adapter graph is missing. no-adapters: an empty adapter list. wrong-kind: a
    // fusion slot declared as a plain adapter slot.
    std::fs::remove_file(repo.join("tasks/fusion-pruned/1/adapters/fc/layer1_ffn.onnx")).unwrap();
    let edit = |task: &str, f: &dyn Fn(&mut Value)| {
        let p = repo.join("tasks").join(task).join("1/task.json");
        let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut m);
        std::fs::write(&p, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    };
    edit("no-adapters", &|m| m["slots"][0]["adapters"] = Value::Array(vec![]));
    edit("wrong-kind", &|m| m["slots"][1]["kind"] = "adapter".into());
    edit("up-on-fusion", &|m| m["slots"][0]["up"] = "adapters/fa/layer0_ffn.onnx".into());

    let server = TestServer::start_on(repo, &[]);
    let mut c = server.client().await;
    let list = c.list_tasks(ListTasksRequest {}).await.unwrap().into_inner().tasks;
    let get = |name: &str| list.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("{name} listed"));
    assert_eq!(get("fusion").status, TaskStatus::Ready as i32, "{}", get("fusion").status_reason);
    assert!(get("fusion").slots.iter().any(|s| s == "1:ffn:fusion[fa,fb,fc]"), "{:?}", get("fusion").slots);
    for (name, needle) in [
        ("fusion-pruned", "layer1_ffn.onnx"),
        ("no-adapters", "lists no adapters"),
        ("wrong-kind", "is not `\"kind\": \"fusion\"`"),
        ("up-on-fusion", "`up` belongs to adapter slots"),
    ] {
        let t = get(name);
        assert_eq!(t.status, TaskStatus::Failed as i32, "{name}");
        assert!(t.status_reason.contains(needle), "{name}: {}", t.status_reason);
    }
    let ok = c.infer(request(&[("fusion", None)], Inputs::Texts(Texts { texts: vec!["fine".into()] }), true)).await.unwrap().into_inner();
    assert_eq!(ok.results[0].fusion_weights.len(), 2);
    let err = c.infer(request(&[("fusion-pruned", None)], Inputs::Texts(Texts { texts: vec!["x".into()] }), false)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}
