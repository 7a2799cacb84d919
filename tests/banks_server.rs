//! The served bank path: a request fanning out to tasks with AdapterHub weights at different drop
//! depths costs 1 + L session runs (`adapterdrop_graph_runs_total`), at most L + 4, and answers
//! what the numpy reference says (expected.json); `engine.banks = false` serves the same numbers
//! through the per-task segments at a higher run count.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use adapterdrop_serve::proto::{InferRequest, TaskRef, TokenIds, TokenizedInputs, infer_request::Inputs};
use common::{TestServer, max_abs_diff, test_repo};
use serde_json::Value;

const MINILM_LAYERS: u32 = 6;

fn metric(addr: &str, name: &str) -> f64 {
    let mut s = TcpStream::connect(addr).expect("metrics port");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The first case of a task in expected.json: unpadded ids and logits per drop depth.
fn case(task: &str) -> (Vec<TokenIds>, Value) {
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(test_repo().join("expected.json")).unwrap()).unwrap();
    let c = &exp["tasks"][task]["cases"][0];
    let ids: Vec<TokenIds> = c["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(c["token_type_ids"].as_array().unwrap())
        .map(|(i, t)| {
            let input_ids: Vec<i64> = i.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            let token_type_ids = t.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            TokenIds { attention_mask: vec![1; input_ids.len()], input_ids, token_type_ids }
        })
        .collect();
    (ids, c["logits"].clone())
}

/// Runs the fan-out, checks it against the reference; session runs, batches and every logit.
async fn fan_out(server: &TestServer) -> (f64, f64, Vec<f32>) {
    let (ids, pf) = case("mini-pfeiffer");
    let (ids_hb, hb) = case("mini-houlsby");
    assert_eq!(ids, ids_hb, "both tasks share their inputs");
    let depths = [("mini-pfeiffer", 0u32, &pf), ("mini-houlsby", 3, &hb), ("mini-pfeiffer", 5, &pf), ("mini-houlsby", 6, &hb)];
    let (runs0, batches0) =
        (metric(&server.metrics_addr, "adapterdrop_graph_runs_total"), metric(&server.metrics_addr, "adapterdrop_batches_total"));
    let mut c = server.client().await;
    let req = InferRequest {
        tasks: depths
            .iter()
            .map(|(t, n, _)| TaskRef { name: t.to_string(), version: None, drop_first: Some(*n), ..Default::default() })
            .collect(),
        inputs: Some(Inputs::Tokens(TokenizedInputs { sequences: ids.clone() })),
        ..Default::default()
    };
    let resp = c.infer(req).await.expect("fan-out").into_inner();
    for ((task, n, want), got) in depths.iter().zip(&resp.results) {
        let want = want[n.to_string()].as_array().unwrap();
        for (seq, w) in got.sequences.iter().zip(want) {
            let w: Vec<f64> = w.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let d = max_abs_diff(&seq.logits, &w);
            assert!(d <= 1e-4, "{task} n = {n}: {d:e} from the reference");
        }
    }
    let runs = metric(&server.metrics_addr, "adapterdrop_graph_runs_total") - runs0;
    let batches = metric(&server.metrics_addr, "adapterdrop_batches_total") - batches0;
    (runs, batches, resp.results.iter().flat_map(|r| r.sequences.iter().flat_map(|s| s.logits.iter().copied())).collect())
}

#[tokio::test]
async fn a_fan_out_over_bank_tasks_costs_one_run_per_layer() {
    let server = TestServer::start(&[]);
    let (runs, batches, _) = fan_out(&server).await;
    assert_eq!(batches, 1.0);
    assert_eq!(runs, f64::from(1 + MINILM_LAYERS), "embeddings + one layer graph per layer; heads on the host");
    assert!(runs <= f64::from(MINILM_LAYERS + 4));
}

#[tokio::test]
async fn banks_off_serves_the_same_numbers_through_the_segments() {
    let server = TestServer::start(&[("ADAPTERDROP__ENGINE__BANKS", "false")]);
    let (runs, batches, _) = fan_out(&server).await;
    assert_eq!(batches, 1.0);
    assert!(runs > f64::from(MINILM_LAYERS + 4), "the per-task path runs segments and slots separately: {runs}");
}

/// `runtime.io_binding = on` (`src/runtime/bound.rs`; the default under CUDA): the same fan-out
/// answers the reference in the same session runs, and the plain runs' numbers within 1e-6.
#[tokio::test]
async fn io_binding_on_serves_the_same_numbers_in_one_run_per_layer() {
    let (on, off) = (
        TestServer::start(&[("ADAPTERDROP__RUNTIME__IO_BINDING", "on")]),
        TestServer::start(&[("ADAPTERDROP__RUNTIME__IO_BINDING", "off")]),
    );
    let (runs, batches, a) = fan_out(&on).await;
    assert_eq!((runs, batches), (f64::from(1 + MINILM_LAYERS), 1.0));
    // Twice: the second batch reuses the bindings, mirrors and buffers of the first.
    let (_, _, again) = fan_out(&on).await;
    let (_, _, b) = fan_out(&off).await;
    assert_eq!(a.len(), b.len());
    let d = a.iter().zip(&b).chain(again.iter().zip(&b)).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    assert!(d <= 1e-6, "io_binding on vs off: {d:e}");
}
