//! SIGTERM: queued and in-flight requests still complete, then the process exits with code 0.
//! (New streams are refused while draining, so health's NOT_SERVING reaches only open Watch streams.)

mod common;

use std::time::Duration;

use adapterdrop_serve::proto::{InferRequest, TaskRef, Texts, infer_request::Inputs};
use common::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_queued_requests_then_exits_cleanly() {
    // A long batching window keeps the request queued while the signal arrives.
    let mut server = TestServer::start(&[("ADAPTERDROP__BATCHING__MAX_BATCH_DELAY_MS", "1000")]);
    let mut client = server.client().await;
    let request = InferRequest {
        tasks: vec![TaskRef { name: "mini-pfeiffer".into(), version: None, drop_first: Some(2) }],
        inputs: Some(Inputs::Texts(Texts { texts: vec!["still answered during shutdown".into()] })),
        truncate: false,
        return_fusion_weights: false,
        id: "draining".into(),
    };
    let in_flight = tokio::spawn(async move { client.infer(request).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.terminate();
    let answer = in_flight.await.unwrap().expect("queued request completes during drain");
    assert_eq!(answer.into_inner().id, "draining");
    let status = tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(20))).expect("server exits after draining");
    assert!(status.success(), "exit status {status:?}");
    let logs = server.drain_logs().join("\n");
    assert!(logs.contains("draining in-flight requests") && logs.contains("server stopped"), "{logs}");
}
