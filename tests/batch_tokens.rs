//! Token accounting and length-aware batching (issue 15): a batch of mixed lengths reports its
//! real, computed and attention token positions in the native response's timings and in
//! `adapterdrop_batch_tokens{kind}`, on the padded and packed bank paths and on the per-task
//! segment path, and the padded engine computes more than is real, the packed one no more; a backlog of mixed lengths forms batches of equal
//! lengths with `batching.length_wait_ms` (none padded) and mixed ones first come, first served,
//! with every result equal to the request served alone (1e-5).

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
        tasks: vec![TaskRef { name: task.into(), version: None, drop_first: Some(0), ..Default::default() }],
        inputs: Some(Inputs::Tokens(TokenizedInputs { sequences })),
        ..Default::default()
    }
}

fn batch_tokens(server: &TestServer, kind: &str) -> f64 {
    metric_sum(&scrape(&server.metrics_addr), "adapterdrop_batch_tokens_sum", &format!("kind=\"{kind}\""))
}

/// One request of three sequences (3, 40 and 11 tokens): its timings and the metric count the
/// batch's token positions. `packed`: per-token work runs on real tokens only (packed tokens).
async fn mixed_lengths_are_counted(server: &TestServer, packed: bool) -> InferResponse {
    let lengths = [3usize, 40, 11];
    let before: Vec<f64> = ["real", "computed", "attention"].iter().map(|k| batch_tokens(server, k)).collect();
    let mut c = server.client().await;
    let seqs = lengths.iter().enumerate().map(|(i, &n)| tokens(n, i as i64)).collect();
    let resp = c.infer(request("mini-pfeiffer", seqs)).await.expect("infer").into_inner();
    let t = resp.timings.expect("timings");
    assert_eq!(t.batch_rows, 3, "the request ran alone");
    let real: u64 = lengths.iter().map(|&n| n as u64).sum::<u64>() * LAYERS;
    let padded = 3 * 40 * LAYERS;
    assert_eq!(t.real_tokens, real, "{t:?}");
    if packed {
        assert_eq!(t.computed_tokens, real, "packed: no padding outside attention: {t:?}");
        assert!(t.attention_tokens >= real && t.attention_tokens <= padded, "{t:?}");
    } else {
        assert_eq!((t.computed_tokens, t.attention_tokens), (padded, padded), "{t:?}");
        assert!(t.computed_tokens > t.real_tokens, "the padded engine computes padding");
    }
    let after: Vec<f64> = ["real", "computed", "attention"].iter().map(|k| batch_tokens(server, k)).collect();
    let grew: Vec<u64> = after.iter().zip(&before).map(|(a, b)| (a - b) as u64).collect();
    assert_eq!(grew, [t.real_tokens, t.computed_tokens, t.attention_tokens], "adapterdrop_batch_tokens{{kind}} counts the same batch");
    resp
}

#[tokio::test]
async fn a_mixed_length_batch_reports_real_computed_and_attention_tokens_on_every_path() {
    let padded_banks = TestServer::start(&[("ADAPTERDROP__ENGINE__PACKING", "false")]);
    let on_banks = mixed_lengths_are_counted(&padded_banks, false).await;
    let text = scrape(&padded_banks.metrics_addr);
    for kind in ["real", "computed", "attention"] {
        assert!(text.contains(&format!("adapterdrop_batch_tokens_count{{kind=\"{kind}\"}} 1")), "one batch of kind {kind}:\n{text}");
    }
    drop(padded_banks);
    let segments = TestServer::start(&[("ADAPTERDROP__ENGINE__BANKS", "false")]);
    let on_segments = mixed_lengths_are_counted(&segments, false).await;
    drop(segments);
    let packed = TestServer::start(&[]);
    let on_packed = mixed_lengths_are_counted(&packed, true).await;
    for other in [&on_segments, &on_packed] {
        for (a, b) in on_banks.results[0].sequences.iter().zip(&other.results[0].sequences) {
            let d = a.logits.iter().zip(&b.logits).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(d <= 1e-5, "the paths differ by {d:e}");
        }
    }
}

/// Short and long requests queued behind a slow batch, in alternating order: each answer with
/// its batch's timings, and each answer's logits.
#[cfg(feature = "fault-injection")]
async fn backlog_of_mixed_lengths(length_wait_ms: &str) -> Vec<(InferResponse, InferResponse)> {
    use std::time::Duration;
    const MARKER: i64 = 29_999;
    let server = TestServer::start(&[
        ("ADAPTERDROP_FAULT_SLOW_BATCH", &MARKER.to_string()),
        ("ADAPTERDROP__BATCHING__MAX_BATCH_TOKENS", "128"),
        ("ADAPTERDROP__BATCHING__MAX_BATCH_DELAY_MS", "20"),
        ("ADAPTERDROP__BATCHING__LENGTH_WAIT_MS", length_wait_ms),
        // The warm-up's cold pace would make admission refuse the backlog by estimated wait.
        ("ADAPTERDROP__BATCHING__MAX_QUEUE_WAIT_MS", "0"),
        // The padded layout, where a mixed batch's padding shows in its computed tokens.
        ("ADAPTERDROP__ENGINE__PACKING", "false"),
    ]);
    let mut client = server.client().await;
    // A first request warms the server up, so that the slow one starts at once.
    client.infer(request("mini-pfeiffer", vec![tokens(5, 0)])).await.expect("warm-up");
    let mut slow = tokens(4, 0);
    slow.input_ids[1] = MARKER;
    let mut calls = Vec::new();
    // The slow batch, then a filler that fills the batch formed while it runs (2 x 60 = 120 of
    // 128): every later request waits in the queue until the slow batch ends.
    let first: Vec<InferRequest> = vec![request("mini-pfeiffer", vec![slow]), request("mini-pfeiffer", vec![tokens(60, 1), tokens(60, 2)])];
    let mut reqs: Vec<InferRequest> = Vec::new();
    for i in 0..16 {
        reqs.push(request("mini-pfeiffer", vec![tokens(if i % 2 == 0 { 5 } else { 60 }, 10 + i)]));
    }
    for (i, r) in first.into_iter().chain(reqs.iter().cloned()).enumerate() {
        let mut c = client.clone();
        calls.push(tokio::spawn(async move { c.infer(r).await.expect("queued request").into_inner() }));
        // The slow batch starts first; the rest are sent 20 ms apart, in this order.
        tokio::time::sleep(Duration::from_millis(if i == 0 { 200 } else { 20 })).await;
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    let mut out = Vec::new();
    let mut c = client.clone();
    for (r, batched) in reqs.into_iter().zip(answers.into_iter().skip(2)) {
        let alone = c.infer(r).await.expect("alone").into_inner();
        out.push((batched, alone));
    }
    out
}

#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn a_backlog_of_mixed_lengths_batches_equal_lengths_and_answers_as_served_alone() {
    for (wait, grouped) in [("10000", true), ("0", false)] {
        let answers = backlog_of_mixed_lengths(wait).await;
        let padded = answers.iter().filter(|(b, _)| b.timings.is_some_and(|t| t.computed_tokens > t.real_tokens)).count();
        if grouped {
            assert_eq!(padded, 0, "grouped by length, no batch is padded");
        } else {
            // In arrival order a short and a long share each batch (checks that the test can fail).
            assert!(padded >= 8, "first come, first served pads most batches ({padded} of 16)");
        }
        for (i, (batched, alone)) in answers.iter().enumerate() {
            let t = batched.timings.expect("timings");
            assert!(t.batch_rows >= 2, "request {i} shared its batch: {t:?}");
            for (a, b) in batched.results[0].sequences.iter().zip(&alone.results[0].sequences) {
                let d = a.logits.iter().zip(&b.logits).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                assert!(d <= 1e-5, "request {i} (length_wait_ms = {wait}): batched vs alone differ by {d:e}");
            }
        }
    }
}
