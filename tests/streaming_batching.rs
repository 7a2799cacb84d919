//! Streaming RPC, cross-request batching (mixed tasks and drop depths in one engine batch, equal to
//! unbatched results) and back-pressure.

mod common;

use adapterdrop_serve::proto::{InferRequest, TaskRef, Texts, infer_request::Inputs, infer_stream_response::Result as StreamResult};
use common::TestServer;
use tokio_stream::StreamExt;

fn request(id: &str, task: &str, n: Option<u32>, texts: &[&str]) -> InferRequest {
    InferRequest {
        tasks: vec![TaskRef { name: task.into(), version: None, drop_first: n }],
        inputs: Some(Inputs::Texts(Texts { texts: texts.iter().map(|t| t.to_string()).collect() })),
        truncate: false,
        return_fusion_weights: false,
        id: id.into(),
    }
}

#[tokio::test]
async fn streamed_requests_batch_across_tasks_and_depths_and_equal_unary_results() {
    // A long batching window makes the streamed requests share engine batches.
    let server = TestServer::start(&[("ADAPTERDROP__BATCHING__MAX_BATCH_DELAY_MS", "200")]);
    let mut client = server.client().await;
    let mut reqs = Vec::new();
    for i in 0..12u32 {
        let task = if i % 3 == 0 { "mini-houlsby" } else { "mini-pfeiffer" };
        let text = format!("request number {i} says something {}", "quite long ".repeat(i as usize));
        reqs.push(request(&format!("r{i}"), task, Some(i % 7), &[text.as_str(), "short one"]));
    }
    reqs.push(request("bad", "mini-pfeiffer", Some(9), &["out of range drop"]));
    let outbound = tokio_stream::iter(reqs.clone());
    let mut answers = client.infer_stream(outbound).await.expect("stream").into_inner();
    let mut got = std::collections::HashMap::new();
    while let Some(msg) = answers.next().await {
        let msg = msg.expect("stream item");
        got.insert(msg.id.clone(), msg.result.expect("result"));
        if got.len() == reqs.len() {
            break;
        }
    }
    assert_eq!(got.len(), reqs.len());
    match &got["bad"] {
        StreamResult::Error(e) => assert!(e.code == tonic::Code::InvalidArgument as i32 && e.message.contains("robust range"), "{e:?}"),
        other => panic!("bad request answered {other:?}"),
    }
    let mut shared = 0;
    for r in reqs.iter().filter(|r| r.id != "bad") {
        let StreamResult::Response(streamed) = &got[&r.id] else { panic!("{} failed: {:?}", r.id, got[&r.id]) };
        assert_eq!(streamed.id, r.id);
        if streamed.timings.as_ref().unwrap().batch_rows > 2 {
            shared += 1;
        }
        // Unary, one at a time: a batch of its own.
        let alone = client.infer(r.clone()).await.unwrap().into_inner();
        for (a, b) in streamed.results[0].sequences.iter().zip(&alone.results[0].sequences) {
            let d = a.logits.iter().zip(&b.logits).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(d <= 1e-5, "{}: batched vs alone differ by {d:e}", r.id);
        }
    }
    assert!(shared >= 2, "requests never shared an engine batch ({shared})");
}

#[tokio::test]
async fn a_full_queue_answers_resource_exhausted_and_recovers() {
    let server = TestServer::start(&[("ADAPTERDROP__BATCHING__MAX_QUEUED", "1")]);
    let text = "a sentence long enough to keep the engine busy for a little while ".repeat(6);
    let texts: Vec<&str> = std::iter::repeat_n(text.as_str(), 32).collect();
    let mut calls = Vec::new();
    for i in 0..12 {
        let mut c = server.client().await;
        let r = request(&i.to_string(), "mini-pfeiffer", Some(0), &texts);
        calls.push(tokio::spawn(async move { c.infer(r).await }));
    }
    let (mut ok, mut full) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                assert!(s.message().contains("max_queued"), "{}", s.message());
                full += 1;
            }
            Err(s) => panic!("unexpected status {s:?}"),
        }
    }
    assert!(ok >= 1 && full >= 1, "ok {ok}, resource exhausted {full}");
    let mut c = server.client().await;
    c.infer(request("after", "mini-pfeiffer", None, &["still serving"])).await.expect("recovered");
}

#[tokio::test]
async fn a_request_whose_deadline_passes_in_the_queue_gets_deadline_exceeded() {
    // A long batching window holds the request in the queue past its 300 ms deadline.
    let server = TestServer::start(&[("ADAPTERDROP__BATCHING__MAX_BATCH_DELAY_MS", "1500")]);
    let mut c = server.client().await;
    // The raw header, as any gRPC client sends it (tonic's own client would also cancel locally).
    let mut r = tonic::Request::new(request("late", "mini-pfeiffer", None, &["too late"]));
    r.metadata_mut().insert("grpc-timeout", "300m".parse().unwrap());
    let status = c.infer(r).await.expect_err("deadline");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    c.infer(request("next", "mini-pfeiffer", None, &["on time"])).await.expect("still serving");
}
