//! The adversarial table: hostile and malformed requests of many kinds, native and KServe, each
//! with the status it must get (the table is in `cases.rs`). After every one the server must
//! still be up and answer a valid request of each API exactly as before. Ends with what the
//! requests must not have done to the metrics (no series per client-chosen name) and a KServe
//! deadline that must be counted.

mod cases;
#[path = "../common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::time::Duration;

use adapterdrop_serve::kserve_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use adapterdrop_serve::kserve_proto::infer_parameter::ParameterChoice;
use adapterdrop_serve::proto::inference_client::InferenceClient;
use cases::{Call, MAX_MESSAGE, MAX_TOKENS, cases, kserve, kserve_text, native, raw_elems, tensor, texts, with_param};
use common::TestServer;
use tonic::Code;
use tonic::transport::Channel;

/// The reference answers, which every case must leave unchanged.
async fn reference(n: &mut InferenceClient<Channel>, k: &mut GrpcInferenceServiceClient<Channel>) -> (Vec<f32>, Vec<Vec<u8>>) {
    let r = n.infer(native(&["sent", "topic"], texts(&["a good film", "a dull one"]))).await.expect("native reference").into_inner();
    let scores = r.results.iter().flat_map(|t| t.sequences.iter().flat_map(|s| s.scores.iter().copied())).collect();
    let k = k.model_infer(kserve_text("sent", "a good film")).await.expect("KServe reference").into_inner();
    (scores, k.raw_output_contents)
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to metrics port");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.split_once("\r\n\r\n").expect("HTTP response").1.to_string()
}

#[tokio::test]
async fn hostile_requests_get_their_status_and_change_nothing() {
    let server = TestServer::start(&[
        ("ADAPTERDROP__SERVER__MAX_MESSAGE_BYTES", &MAX_MESSAGE.to_string()),
        ("ADAPTERDROP__LIMITS__MAX_TOKENS_PER_REQUEST", &MAX_TOKENS.to_string()),
    ]);
    let mut n = server.client().await;
    let mut k = GrpcInferenceServiceClient::new(server.channel().await);
    let before = reference(&mut n, &mut k).await;
    let cases = cases();
    assert!(cases.len() >= 40, "{} kinds", cases.len());
    for case in cases {
        let started = std::time::Instant::now();
        let result = match case.call {
            Call::Native(r) => n.infer(r).await.map(|_| ()),
            Call::KServe(r) => k.model_infer(r).await.map(|_| ()),
        };
        let status = result.expect_err(case.what);
        println!("{:>9.1?}  {:?}  {}", started.elapsed(), status.code(), case.what);
        assert_eq!(status.code(), case.code, "{}: {}", case.what, status.message());
        assert!(status.message().contains(case.needle), "{}: message `{}` lacks `{}`", case.what, status.message(), case.needle);
        assert!(status.message().len() <= 1100, "{}: {} bytes of message", case.what, status.message().len());
        assert_eq!(reference(&mut n, &mut k).await, before, "after `{}` the answers changed", case.what);
    }

    // Extreme but valid numbers are served, not turned into overflows.
    let far = with_param(kserve_text("sent", "a good film"), "timeout", ParameterChoice::Uint64Param(u64::MAX));
    assert_eq!(k.model_infer(far).await.expect("timeout u64::MAX").into_inner().raw_output_contents, before.1);

    // A flood of client-chosen task names adds no metric series.
    for i in 0..5 {
        let names: Vec<String> = (0..200).map(|j| format!("flood-{i}-{j}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_eq!(n.infer(native(&refs, texts(&["hi"]))).await.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(n.infer(native(&[&names[0]], texts(&["hi"]))).await.unwrap_err().code(), Code::NotFound);
        assert_eq!(k.model_infer(kserve_text(&names[1], "hi")).await.unwrap_err().code(), Code::NotFound);
    }
    // A KServe request past its deadline is counted like any other answer.
    let mut late = tonic::Request::new(kserve(
        "sent",
        vec![tensor("TEXT", "BYTES", &[64])],
        vec![raw_elems(&vec!["a rather long sentence to tokenize and run".as_bytes(); 64])],
    ));
    late.set_timeout(Duration::from_millis(5));
    let late = k.model_infer(late).await.unwrap_err();
    assert!(matches!(late.code(), Code::DeadlineExceeded | Code::Cancelled), "{late:?}");
    let text = http_get(&server.metrics_addr, "/metrics");
    assert!(!text.contains("flood-"), "client-chosen names became labels");
    let series = text.lines().filter(|l| l.starts_with("adapterdrop_requests_total{")).count();
    println!("adapterdrop_requests_total series after the table and the flood: {series}");
    assert!(series <= 24, "{series} request series:\n{text}");
    assert!(text.contains(r#"adapterdrop_requests_total{api="native",code="NotFound",task="unknown"}"#), "{text}");
    assert!(text.contains(r#"adapterdrop_requests_total{api="kserve",code="DeadlineExceeded",task="sent"}"#), "{text}");
}
