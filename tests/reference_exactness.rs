//! Served logits equal the independent numpy reference (tools/adapterdrop_tools/reference.py,
//! written from the formulas) for every task in the test repository, every drop depth, every input
//! form; and batching or fan-out never changes a result.

mod common;

use adapterdrop_serve::proto::{
    InferRequest, InferResponse, TaskRef, TextPair, TextPairs, Texts, TokenIds, TokenizedInputs, infer_request::Inputs,
};
use common::{TestServer, max_abs_diff, test_repo};
use serde_json::Value;

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(test_repo().join("expected.json")).unwrap()).unwrap()
}

fn ids_of(case: &Value) -> Vec<TokenIds> {
    let col = |k: &str, r: usize| case[k][r].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect::<Vec<_>>();
    (0..case["input_ids"].as_array().unwrap().len())
        .map(|r| TokenIds {
            input_ids: col("input_ids", r),
            attention_mask: col("attention_mask", r),
            token_type_ids: col("token_type_ids", r),
        })
        .collect()
}

fn rows(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()).collect()
}

fn request(tasks: &[(&str, Option<u32>)], inputs: Inputs) -> InferRequest {
    InferRequest {
        tasks: tasks.iter().map(|(n, d)| TaskRef { name: n.to_string(), version: None, drop_first: *d, ..Default::default() }).collect(),
        inputs: Some(inputs),
        truncate: false,
        return_fusion_weights: false,
        id: String::new(),
        ..Default::default()
    }
}

fn logits(resp: &InferResponse, task: usize) -> Vec<Vec<f32>> {
    resp.results[task].sequences.iter().map(|s| s.logits.clone()).collect()
}

#[tokio::test]
async fn every_task_every_drop_depth_matches_the_numpy_reference() {
    let server = TestServer::start(&[]);
    let mut client = server.client().await;
    let exp = expected();
    let mut checked = 0;
    for (task, spec) in exp["tasks"].as_object().unwrap() {
        for case in spec["cases"].as_array().unwrap() {
            let mut forms = vec![("ids", Inputs::Tokens(TokenizedInputs { sequences: ids_of(case) }))];
            if let Some(texts) = case["texts"].as_array() {
                forms.push(("texts", Inputs::Texts(Texts { texts: texts.iter().map(|t| t.as_str().unwrap().into()).collect() })));
            }
            if let Some(pairs) = case["pairs"].as_array() {
                let pairs =
                    pairs.iter().map(|p| TextPair { text: p[0].as_str().unwrap().into(), text_pair: p[1].as_str().unwrap().into() });
                forms.push(("pairs", Inputs::Pairs(TextPairs { pairs: pairs.collect() })));
            }
            let robust = spec["drop"].get("robust").is_some();
            let mut depths: Vec<(Option<u32>, Vec<Vec<f64>>)> = vec![(None, rows(&case["default_logits"]))];
            if robust {
                for (n, l) in case["logits"].as_object().unwrap() {
                    depths.push((Some(n.parse().unwrap()), rows(l)));
                }
            }
            for (form, inputs) in &forms {
                for (n, want) in &depths {
                    let resp =
                        client.infer(request(&[(task, *n)], inputs.clone())).await.unwrap_or_else(|s| panic!("{task} {form} n={n:?}: {s}"));
                    let got = logits(&resp.into_inner(), 0);
                    for (r, (g, w)) in got.iter().zip(want).enumerate() {
                        let d = max_abs_diff(g, w);
                        assert!(d <= 1e-4, "{task} {form} n={n:?} row {r}: max abs {d:e}\n got {g:?}\n want {w:?}");
                    }
                    assert_eq!(got.len(), want.len());
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 60, "only {checked} comparisons ran");
}

#[tokio::test]
async fn a_sequence_gives_the_same_result_alone_or_batched_with_longer_ones() {
    let server = TestServer::start(&[]);
    let mut client = server.client().await;
    let short = "short".to_string();
    let long = "a considerably longer sentence that forces padding of the short one in the same batch".to_string();
    let known = expected();
    for (task, n) in [("rand-houlsby", 1), ("mini-pfeiffer", 2), ("sent", 0)] {
        if known["tasks"].get(task).is_none() {
            continue; // the GPU check's small repository has no MiniLM
        }
        let alone =
            client.infer(request(&[(task, Some(n))], Inputs::Texts(Texts { texts: vec![short.clone()] }))).await.unwrap().into_inner();
        let batched = client
            .infer(request(&[(task, Some(n))], Inputs::Texts(Texts { texts: vec![long.clone(), short.clone(), long.clone()] })))
            .await
            .unwrap()
            .into_inner();
        let a = &logits(&alone, 0)[0];
        let b = &logits(&batched, 0)[1];
        let d = max_abs_diff(a, &b.iter().map(|v| *v as f64).collect::<Vec<_>>());
        assert!(d <= 1e-5, "{task}: alone vs batched differ by {d:e}");
    }
}

#[tokio::test]
async fn fan_out_to_several_tasks_equals_asking_each_alone() {
    let server = TestServer::start(&[]);
    let mut client = server.client().await;
    let known = expected();
    let texts = Inputs::Texts(Texts { texts: vec!["the plot never comes together.".into(), "a gripping film".into()] });
    // Mixed adapter configs and drop depths on one backbone, plus a duplicate reference; on MiniLM
    // and on the tiny random backbone (the only one in the GPU check's small repository).
    let sets: [&[(&str, Option<u32>)]; 2] = [
        &[("mini-pfeiffer", Some(3)), ("mini-houlsby", Some(1)), ("mini-pfeiffer", Some(6)), ("mini-pfeiffer", Some(3))],
        &[
            ("rand-pfeiffer", Some(1)),
            ("rand-houlsby", Some(0)),
            ("rand-pfeiffer", Some(3)),
            ("rand-houlsby", Some(2)),
            ("rand-pfeiffer", Some(1)),
        ],
    ];
    let mut ran = 0;
    for tasks in sets {
        if tasks.iter().any(|(t, _)| known["tasks"].get(*t).is_none()) {
            continue;
        }
        ran += 1;
        let fanned = client.infer(request(tasks, texts.clone())).await.unwrap().into_inner();
        assert_eq!(fanned.results.len(), tasks.len());
        for (i, t) in tasks.iter().enumerate() {
            let alone = client.infer(request(&[*t], texts.clone())).await.unwrap().into_inner();
            for (g, w) in logits(&fanned, i).iter().zip(logits(&alone, 0)) {
                let d = max_abs_diff(g, &w.iter().map(|v| *v as f64).collect::<Vec<_>>());
                assert!(d <= 1e-5, "{t:?}: fan-out vs alone differ by {d:e}");
            }
            assert_eq!(fanned.results[i].dropped_layers, alone.results[0].dropped_layers);
        }
    }
    assert!(ran >= 1, "no fan-out set found in the test repository");
}
