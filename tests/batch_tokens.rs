//! Token accounting (issue 15): a batch of mixed lengths reports its real, computed and attention
//! token positions in the native response's timings and in `adapterdrop_batch_tokens{kind}`, on
//! the bank path and on the per-task segment path, and the padded engine computes more than is real.

mod common;

use adapterdrop_serve::proto::{InferRequest, InferResponse, TaskRef, TokenIds, TokenizedInputs, infer_request::Inputs};
use common::{TestServer, metric_sum, scrape};

/// Layers of the test repository's MiniLM-shaped backbone.
const LAYERS: u64 = 6;

/// One tokenized sequence of `len` tokens (ids are ordinary vocabulary entries).
pub fn tokens(len: usize, seed: i64) -> TokenIds {
    let input_ids: Vec<i64> = (0..len as i64).map(|i| 1000 + (i * 7 + seed * 13) % 5000).collect();
    TokenIds { attention_mask: vec![1; len], token_type_ids: vec![0; len], input_ids }
}

pub fn request(task: &str, sequences: Vec<TokenIds>) -> InferRequest {
    InferRequest {
        tasks: vec![TaskRef { name: task.into(), version: None, drop_first: Some(0) }],
        inputs: Some(Inputs::Tokens(TokenizedInputs { sequences })),
        ..Default::default()
    }
}

fn batch_tokens(server: &TestServer, kind: &str) -> f64 {
    metric_sum(&scrape(&server.metrics_addr), "adapterdrop_batch_tokens_sum", &format!("kind=\"{kind}\""))
}

async fn mixed_lengths_are_counted(server: &TestServer) -> InferResponse {
    let lengths = [3usize, 40, 11];
    let before: Vec<f64> = ["real", "computed", "attention"].iter().map(|k| batch_tokens(server, k)).collect();
    let mut c = server.client().await;
    let seqs = lengths.iter().enumerate().map(|(i, &n)| tokens(n, i as i64)).collect();
    let resp = c.infer(request("mini-pfeiffer", seqs)).await.expect("infer").into_inner();
    let t = resp.timings.expect("timings");
    assert_eq!(t.batch_rows, 3, "the request ran alone");
    let real: u64 = lengths.iter().map(|&n| n as u64).sum::<u64>() * LAYERS;
    let padded = 3 * 40 * LAYERS;
    assert_eq!((t.real_tokens, t.computed_tokens, t.attention_tokens), (real, padded, padded), "{t:?}");
    assert!(t.computed_tokens > t.real_tokens, "the padded engine computes padding");
    let after: Vec<f64> = ["real", "computed", "attention"].iter().map(|k| batch_tokens(server, k)).collect();
    let grew: Vec<u64> = after.iter().zip(&before).map(|(a, b)| (a - b) as u64).collect();
    assert_eq!(grew, [real, padded, padded], "adapterdrop_batch_tokens{{kind}} counts the same batch");
    resp
}

#[tokio::test]
async fn a_mixed_length_batch_reports_real_computed_and_attention_tokens_on_both_paths() {
    let banks = TestServer::start(&[]);
    let on_banks = mixed_lengths_are_counted(&banks).await;
    let text = scrape(&banks.metrics_addr);
    for kind in ["real", "computed", "attention"] {
        assert!(text.contains(&format!("adapterdrop_batch_tokens_count{{kind=\"{kind}\"}} 1")), "one batch of kind {kind}:\n{text}");
    }
    drop(banks);
    let segments = TestServer::start(&[("ADAPTERDROP__ENGINE__BANKS", "false")]);
    let on_segments = mixed_lengths_are_counted(&segments).await;
    for (a, b) in on_banks.results[0].sequences.iter().zip(&on_segments.results[0].sequences) {
        let d = a.logits.iter().zip(&b.logits).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(d <= 1e-5, "bank and segment paths differ by {d:e}");
    }
}
