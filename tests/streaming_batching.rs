//! Streaming RPC, cross-request batching (mixed tasks and drop depths in one engine batch, equal to
//! unbatched results) and back-pressure.

mod common;

use adapterdrop_serve::proto::{InferRequest, TaskRef, Texts, infer_request::Inputs, infer_stream_response::Result as StreamResult};
use std::time::{Duration, Instant};

use common::TestServer;
use tokio_stream::StreamExt;

fn request(id: &str, task: &str, n: Option<u32>, texts: &[&str]) -> InferRequest {
    InferRequest {
        tasks: vec![TaskRef { name: task.into(), version: None, drop_first: n, ..Default::default() }],
        inputs: Some(Inputs::Texts(Texts { texts: texts.iter().map(|t| t.to_string()).collect() })),
        truncate: false,
        return_fusion_weights: false,
        id: id.into(),
        ..Default::default()
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

/// A unary call over a bare HTTP/2 stream, as any gRPC client sends it but without a local timer:
/// headers (with `grpc-timeout`) first, the message `body_delay` later (a slow link or a large
/// message). Returns the grpc-status, its message, and when it arrived, counted from the headers
/// (where a client's own deadline timer starts).
async fn raw_unary(addr: &str, path: &str, timeout: &str, body_delay: Duration, msg: Vec<u8>) -> (String, String, Duration) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(())
        .unwrap();
    let started = Instant::now();
    let (response, mut send) = client.send_request(req, false).expect("send headers");
    tokio::time::sleep(body_delay).await;
    let mut frame = vec![0u8];
    frame.extend((msg.len() as u32).to_be_bytes());
    frame.extend(msg);
    send.send_data(frame.into(), true).expect("send message");
    let (parts, mut body) = response.await.expect("response").into_parts();
    let status = |h: &http::HeaderMap| {
        let get = |k: &str| h.get(k).map(|v| v.to_str().unwrap_or("?").to_string());
        get("grpc-status").map(|s| (s, get("grpc-message").unwrap_or_default()))
    };
    if let Some((code, message)) = status(&parts.headers) {
        return (code, message, started.elapsed());
    }
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.expect("trailers").expect("a trailer with grpc-status");
    let (code, message) = status(&trailers).expect("grpc-status");
    (code, message, started.elapsed())
}

#[tokio::test]
async fn a_request_whose_deadline_passes_in_the_queue_gets_deadline_exceeded_before_the_clients_own_timer() {
    // A batching window longer than the deadline holds the request in the queue.
    let server = TestServer::start(&[("ADAPTERDROP__BATCHING__MAX_BATCH_DELAY_MS", "5000")]);
    // The message arrives 60 ms after the headers: the server's clock for the deadline starts that
    // much later than the client's. A 4 s deadline must still be answered before the client's own
    // timer would fire: the margin (400 ms) leaves 340 ms for a loaded machine; the former 20 ms
    // margin answered 40 ms after it (tonic's own server timeout even came first, CANCELLED).
    let msg = prost::Message::encode_to_vec(&request("late", "mini-pfeiffer", None, &["too late"]));
    let delay = Duration::from_millis(60);
    let (code, message, took) = raw_unary(&server.addr, "/adapterdrop.v1.Inference/Infer", "4S", delay, msg).await;
    println!("answered after {took:?} of a 4 s deadline (message sent {delay:?} after the headers): {code} {message}");
    assert_eq!(code, (tonic::Code::DeadlineExceeded as i32).to_string(), "{message}");
    assert!(took < Duration::from_secs(4), "answered {took:?} after the headers: after the client's own deadline of 4 s");
    assert!(took > Duration::from_secs(2), "answered after {took:?}: far before the deadline");
    let exceeded = common::metric_sum(&common::scrape(&server.metrics_addr), "adapterdrop_requests_total", "code=\"DeadlineExceeded\"");
    assert_eq!(exceeded, 1.0, "the server's DEADLINE_EXCEEDED answer is counted");
    server.client().await.list_tasks(adapterdrop_serve::proto::ListTasksRequest {}).await.expect("still serving");
}

/// Sends pre-encoded messages (valid or not) and decodes the answers as `M`.
struct RawCodec<M>(std::marker::PhantomData<M>);

struct RawEncoder;
struct ProstDecoder<M>(std::marker::PhantomData<M>);

impl<M: prost::Message + Default + Send + 'static> tonic::codec::Codec for RawCodec<M> {
    type Encode = Vec<u8>;
    type Decode = M;
    type Encoder = RawEncoder;
    type Decoder = ProstDecoder<M>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ProstDecoder<M> {
        ProstDecoder(std::marker::PhantomData)
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl<M: prost::Message + Default> tonic::codec::Decoder for ProstDecoder<M> {
    type Item = M;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<M>, tonic::Status> {
        M::decode(src).map(Some).map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

/// Streams `messages` raw to `path`; the answers, and the status the stream ended with.
async fn raw_stream<M: prost::Message + Default + Send + 'static>(
    channel: tonic::transport::Channel,
    path: &'static str,
    messages: Vec<Vec<u8>>,
) -> (Vec<M>, tonic::Status) {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static(path);
    let request = tonic::Request::new(tokio_stream::iter(messages));
    let mut answers = grpc.streaming(request, path, RawCodec::<M>(std::marker::PhantomData)).await.expect("stream opens").into_inner();
    let mut got = Vec::new();
    loop {
        match answers.message().await {
            Ok(Some(m)) => got.push(m),
            Ok(None) => return (got, tonic::Status::ok("")),
            Err(status) => return (got, status),
        }
    }
}

/// Field 1 (length-delimited) says 5 bytes follow; only 2 do.
const TRUNCATED: &[u8] = b"\x0a\x05ab";

#[tokio::test]
async fn an_undecodable_stream_message_ends_the_stream_with_invalid_argument_after_earlier_answers() {
    use adapterdrop_serve::kserve_proto::{ModelInferRequest, ModelStreamInferResponse};
    use prost::Message;
    let server = TestServer::start(&[]);
    let good = request("good", "mini-pfeiffer", None, &["a fine message"]).encode_to_vec();
    let (answers, status) = raw_stream::<adapterdrop_serve::proto::InferStreamResponse>(
        server.channel().await,
        "/adapterdrop.v1.Inference/InferStream",
        vec![good, TRUNCATED.to_vec()],
    )
    .await;
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0].id, "good");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("stream message 1 could not be decoded"), "{}", status.message());

    // ModelStreamInfer (KServe) the same.
    let good = ModelInferRequest { model_name: "mini-pfeiffer".into(), id: "k".into(), ..Default::default() }.encode_to_vec();
    let (answers, status) = raw_stream::<ModelStreamInferResponse>(
        server.channel().await,
        "/inference.GRPCInferenceService/ModelStreamInfer",
        vec![good, TRUNCATED.to_vec()],
    )
    .await;
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // A message over the codec's element ceilings (5,000 empty token sequences) ends the stream the
    // same way, refused before it is decoded, naming the field.
    let good = request("good", "mini-pfeiffer", None, &["a fine message"]).encode_to_vec();
    let sequences = vec![adapterdrop_serve::proto::TokenIds::default(); 5_000];
    let over = adapterdrop_serve::proto::InferRequest {
        tasks: vec![TaskRef { name: "mini-pfeiffer".into(), ..Default::default() }],
        inputs: Some(Inputs::Tokens(adapterdrop_serve::proto::TokenizedInputs { sequences })),
        ..Default::default()
    };
    let (answers, status) = raw_stream::<adapterdrop_serve::proto::InferStreamResponse>(
        server.channel().await,
        "/adapterdrop.v1.Inference/InferStream",
        vec![good, over.encode_to_vec()],
    )
    .await;
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("`InferRequest.tokens.sequences`"), "{}", status.message());
    let mut c = server.client().await;
    c.infer(request("after", "mini-pfeiffer", None, &["still serving"])).await.expect("still serving");
}

#[tokio::test]
async fn a_stream_whose_client_never_reads_is_not_read_past_its_bound() {
    let server = TestServer::start(&[("ADAPTERDROP__SERVER__MAX_STREAM_IN_FLIGHT", "4")]);
    // A small receive window on the client, so that answers cannot hide in it.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(Some(4096))
        .connect()
        .await
        .unwrap();
    let mut client = adapterdrop_serve::proto::inference_client::InferenceClient::new(channel);
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let outbound = tokio_stream::iter(0u64..).map(move |i| {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        request(&format!("m{i}"), "mini-pfeiffer", None, &["a short text"])
    });
    let answers = client.infer_stream(outbound).await.expect("stream").into_inner();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let text = common::scrape(&server.metrics_addr);
    let served = common::metric_sum(&text, "adapterdrop_requests_total", "api=\"native\"");
    // 4 in flight plus the answers the client's 4 KiB window holds; before the fix the server
    // read and answered every message the client sent (hundreds per second), buffering the answers.
    assert!((4.0..=64.0).contains(&served), "served {served} messages of a stream whose client reads nothing");
    let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("in 3 s the client queued {sent} messages, the server answered {served}");
    drop(answers);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let depth = common::metric_sum(&common::scrape(&server.metrics_addr), "adapterdrop_queue_depth", "");
    assert_eq!(depth, 0.0, "cancelled stream left work queued (client had sent {sent})");
}

#[tokio::test]
async fn cancelling_a_stream_cancels_its_queued_work() {
    let server = TestServer::start(&[
        ("ADAPTERDROP__BATCHING__MAX_BATCH_TOKENS", "256"),
        ("ADAPTERDROP__BATCHING__MAX_QUEUE_WAIT_MS", "0"),
        ("ADAPTERDROP__SERVER__MAX_STREAM_IN_FLIGHT", "64"),
    ]);
    // Requests of one engine batch each, several seconds of work together. The client runs on a
    // runtime of its own that is then dropped: its connection closes, as when a client process
    // dies or cancels the call.
    let addr = server.addr.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(async {
            let mut client = adapterdrop_serve::proto::inference_client::InferenceClient::connect(format!("http://{addr}")).await.unwrap();
            let text = "a sentence long enough to keep the engine busy for a while";
            let texts: Vec<&str> = std::iter::repeat_n(text, 12).collect();
            let heavy: Vec<InferRequest> = (0..60).map(|i| request(&i.to_string(), "mini-pfeiffer", Some(0), &texts)).collect();
            let outbound = tokio_stream::iter(heavy).chain(tokio_stream::pending());
            let mut answers = client.infer_stream(outbound).await.expect("stream").into_inner();
            answers.next().await.expect("first answer").expect("ok");
        });
        drop(rt);
    })
    .join()
    .unwrap();
    let scrape = || common::scrape(&server.metrics_addr);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while common::metric_sum(&scrape(), "adapterdrop_queue_depth", "") > 0.0 {
        assert!(std::time::Instant::now() < end, "a cancelled stream's requests are still queued:\n{}", scrape());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let before = common::metric_sum(&scrape(), "adapterdrop_batches_total", "");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let after = common::metric_sum(&scrape(), "adapterdrop_batches_total", "");
    eprintln!("batches: {before} before the cancel settled, {after} one second later");
    assert!(after - before <= 1.0, "the server ran {} more batches for a stream that was cancelled", after - before);
    assert!(before < 30.0, "the stream's work had finished before it was cancelled ({before} batches); make it heavier");
}
