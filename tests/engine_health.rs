//! Health follows the engine (issue 13 item 7): a panic inside a batch fails only that batch's
//! requests, and when the engine thread itself dies the process says why and health goes
//! NOT_SERVING instead of answering "shutting down" while reporting SERVING.
//! Faults come from test-only hooks (cargo feature `fault-injection`, on in `make test`).
#![cfg(feature = "fault-injection")]

mod common;

use adapterdrop_serve::kserve_proto::ServerReadyRequest;
use adapterdrop_serve::kserve_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use adapterdrop_serve::proto::{InferRequest, TaskRef, Texts, TokenIds, TokenizedInputs, infer_request::Inputs};
use common::TestServer;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A token id no text of these tests produces: the hooks fire on batches holding it.
const MARKER: i64 = 29_999;

fn texts(t: &[&str]) -> InferRequest {
    InferRequest {
        tasks: vec![TaskRef { name: "mini-pfeiffer".into(), version: None, drop_first: None, ..Default::default() }],
        inputs: Some(Inputs::Texts(Texts { texts: t.iter().map(|s| s.to_string()).collect() })),
        ..Default::default()
    }
}

fn marked() -> InferRequest {
    let seq = TokenIds { input_ids: vec![101, MARKER, 102], attention_mask: vec![], token_type_ids: vec![] };
    InferRequest {
        tasks: vec![TaskRef { name: "mini-pfeiffer".into(), version: None, drop_first: None, ..Default::default() }],
        inputs: Some(Inputs::Tokens(TokenizedInputs { sequences: vec![seq] })),
        ..Default::default()
    }
}

async fn status(health: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
    health.check(HealthCheckRequest { service: service.into() }).await.expect("health check").into_inner().status
}

#[tokio::test]
async fn a_panic_inside_a_batch_fails_only_that_batch_and_the_engine_carries_on() {
    let server = TestServer::start(&[("ADAPTERDROP_FAULT_PANIC_BATCH", &MARKER.to_string())]);
    let mut c = server.client().await;
    let before = c.infer(texts(&["the same answer before and after"])).await.expect("served").into_inner();
    let err = c.infer(marked()).await.expect_err("the marked batch panics");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().contains("engine failed on the batch"), "{}", err.message());
    // The engine thread lives on: the next requests are served, with the same answers.
    for _ in 0..3 {
        let after = c.infer(texts(&["the same answer before and after"])).await.expect("served after the panic").into_inner();
        assert_eq!(after.results[0].sequences, before.results[0].sequences);
    }
    let mut health = HealthClient::new(server.channel().await);
    assert_eq!(status(&mut health, "").await, ServingStatus::Serving as i32);
    let logs = server.drain_logs().join("\n");
    assert!(logs.contains("a batch panicked"), "{logs}");
}

#[tokio::test]
async fn when_the_engine_thread_dies_health_goes_not_serving_and_the_log_says_why() {
    engine_stops("ADAPTERDROP_FAULT_KILL_ENGINE", "the engine thread panicked").await;
}

#[tokio::test]
async fn when_the_queue_actor_dies_health_goes_not_serving_and_the_log_says_why() {
    engine_stops("ADAPTERDROP_FAULT_KILL_QUEUE", "the queue actor panicked").await;
}

/// Health, answers and log once the hook `fault` has stopped the engine with `reason`.
async fn engine_stops(fault: &str, reason: &str) {
    let server = TestServer::start(&[(fault, &MARKER.to_string())]);
    let mut c = server.client().await;
    let mut health = HealthClient::new(server.channel().await);
    assert_eq!(status(&mut health, "").await, ServingStatus::Serving as i32);
    c.infer(texts(&["served while the engine lives"])).await.expect("served");

    let err = c.infer(marked()).await.expect_err("the engine thread dies under this request");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("inference engine has stopped"), "{}", err.message());
    // Later requests are refused at once with the reason, not queued forever.
    let started = std::time::Instant::now();
    let err = c.infer(texts(&["after the engine died"])).await.expect_err("no engine");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(reason), "{}", err.message());
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "refusal took {:?}", started.elapsed());

    // Health follows within moments.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while status(&mut health, "").await != ServingStatus::NotServing as i32 {
        assert!(std::time::Instant::now() < end, "health still SERVING after the engine died");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for service in ["adapterdrop.v1.Inference", "inference.GRPCInferenceService", "mini-pfeiffer"] {
        assert_eq!(status(&mut health, service).await, ServingStatus::NotServing as i32, "{service}");
    }
    let mut kserve = GrpcInferenceServiceClient::new(server.channel().await);
    assert!(!kserve.server_ready(ServerReadyRequest {}).await.unwrap().into_inner().ready);
    let logs = server.drain_logs().join("\n");
    assert!(logs.contains(reason) && logs.contains("fault injection"), "{logs}");
}
