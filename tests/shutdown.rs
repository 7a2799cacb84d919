//! SIGTERM: queued and in-flight requests still complete, then the process exits with code 0.
//! Idle streams (InferStream, health Watch) are ended at once instead of holding the drain for
//! the whole grace period, and a drain cut short by the grace period exits non-zero.
//! (New streams are refused while draining, so health's NOT_SERVING reaches only open Watch streams.)

mod common;

use std::time::{Duration, Instant};

use adapterdrop_serve::proto::{InferRequest, TaskRef, Texts, infer_request::Inputs};
use common::TestServer;
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn request(id: &str, texts: Vec<String>) -> InferRequest {
    InferRequest {
        tasks: vec![TaskRef { name: "mini-pfeiffer".into(), version: None, drop_first: Some(2), ..Default::default() }],
        inputs: Some(Inputs::Texts(Texts { texts })),
        truncate: false,
        return_fusion_weights: false,
        id: id.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_queued_requests_then_exits_cleanly() {
    // A long batching window keeps the request queued while the signal arrives.
    let mut server = TestServer::start(&[("ADAPTERDROP__BATCHING__MAX_BATCH_DELAY_MS", "1000")]);
    let mut client = server.client().await;
    let request = request("draining", vec!["still answered during shutdown".into()]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_are_ended_at_drain_instead_of_holding_the_grace_period() {
    // The default 30 s grace: before the fix, either idle stream kept the process up that long.
    let mut server = TestServer::start(&[]);
    let mut client = server.client().await;
    // An InferStream that answered one request and then idles, its client neither sending nor closing.
    let (tx, rx) = tokio::sync::mpsc::channel::<InferRequest>(4);
    let mut answers = client.infer_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("stream").into_inner();
    tx.send(request("first", vec!["one answer, then idle".into()])).await.unwrap();
    assert_eq!(answers.next().await.expect("answer").expect("ok").id, "first");
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health.watch(HealthCheckRequest { service: String::new() }).await.expect("watch").into_inner();
    assert_eq!(watch.next().await.unwrap().unwrap().status, ServingStatus::Serving as i32);

    let started = Instant::now();
    server.terminate();
    // The idle stream ends with UNAVAILABLE (retry elsewhere), not silently.
    let end = tokio::time::timeout(Duration::from_secs(10), answers.next()).await.expect("the idle stream ends at drain");
    let status = end.expect("an ending status").expect_err("UNAVAILABLE");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{}", status.message());
    // The watcher sees NOT_SERVING, then its stream ends.
    let seen: Vec<i32> = tokio::time::timeout(Duration::from_secs(10), async {
        let mut seen = Vec::new();
        while let Some(Ok(m)) = watch.next().await {
            seen.push(m.status);
        }
        seen
    })
    .await
    .expect("the Watch stream ends at drain");
    assert_eq!(seen.last(), Some(&(ServingStatus::NotServing as i32)), "{seen:?}");
    let status = tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(10))).expect("exits well inside the 30 s grace");
    assert!(status.success(), "exit status {status:?}");
    eprintln!("SIGTERM to exit with an idle InferStream and a health Watch open: {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(10), "drain took {:?}", started.elapsed());
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_longer_than_the_grace_period_exits_non_zero_and_says_how_much_was_abandoned() {
    let mut server = TestServer::start(&[
        ("ADAPTERDROP__SERVER__SHUTDOWN_GRACE_S", "1"),
        ("ADAPTERDROP__BATCHING__MAX_BATCH_TOKENS", "4096"),
        ("ADAPTERDROP__BATCHING__MAX_QUEUE_WAIT_MS", "0"),
    ]);
    // Many heavy requests, one engine batch each: several seconds of work.
    let text = "a sentence long enough to keep the engine busy for a little while ".repeat(5);
    let mut calls = Vec::new();
    for i in 0..40 {
        let mut c = server.client().await;
        let r = request(&i.to_string(), vec![text.clone(); 32]);
        calls.push(tokio::spawn(async move { c.infer(r).await }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.terminate();
    let status = tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(15))).expect("exits after the grace period");
    assert_eq!(status.code(), Some(3), "a cut-short drain must not exit 0: {status:?}");
    let unanswered = futures_count(calls).await;
    eprintln!("grace 1 s: exit status {status:?}, {unanswered} of 40 calls unanswered");
    assert!(unanswered > 0, "the backlog finished inside the grace period; make it longer");
    let logs = server.drain_logs().join("\n");
    assert!(logs.contains("grace period over") && logs.contains("requests_abandoned="), "{logs}");
}

/// How many calls failed (the server went away under them).
async fn futures_count(
    calls: Vec<tokio::task::JoinHandle<Result<tonic::Response<adapterdrop_serve::proto::InferResponse>, tonic::Status>>>,
) -> usize {
    let mut failed = 0;
    for c in calls {
        if c.await.unwrap().is_err() {
            failed += 1;
        }
    }
    failed
}
