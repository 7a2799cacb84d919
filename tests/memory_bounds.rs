//! What hostile sizes cost in memory, read from the server's /proc status: the peak (VmHWM) for
//! what a request may take while it is refused, the resident set (VmRSS) for what it keeps.

mod common;

use adapterdrop_serve::kserve_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use adapterdrop_serve::kserve_proto::model_infer_request::InferInputTensor;
use adapterdrop_serve::kserve_proto::{InferTensorContents, ModelInferRequest};
use adapterdrop_serve::proto::{InferRequest, TaskRef, Texts, infer_request::Inputs};
use common::TestServer;
use tonic::Code;

const MIB: u64 = 1 << 20;

/// (VmRSS, VmHWM) of a process, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}"));
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn native(task: &str, texts: Vec<String>, truncate: bool) -> InferRequest {
    InferRequest {
        tasks: vec![TaskRef { name: task.into(), ..Default::default() }],
        inputs: Some(Inputs::Texts(Texts { texts })),
        truncate,
        ..Default::default()
    }
}

fn kserve(inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>) -> ModelInferRequest {
    ModelInferRequest { model_name: "sent".into(), inputs, raw_input_contents: raw, ..Default::default() }
}

fn tensor(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
    InferInputTensor { name: name.into(), datatype: datatype.into(), shape: shape.to_vec(), ..Default::default() }
}

fn raw_text(text: &[u8]) -> Vec<u8> {
    (text.len() as u32).to_le_bytes().into_iter().chain(text.iter().copied()).collect()
}

/// Every API obeys `server.max_message_bytes`, and with `limits.max_concurrent_streams` that
/// bounds what one connection can make the server hold: refused messages cost (almost) nothing,
/// messages over the codec's element ceilings what was received, and decoded ones at most
/// streams x message size x prost's decoding overhead (README "Memory bounds").
#[tokio::test]
async fn message_size_and_declared_counts_bound_memory() {
    const LIMIT: u64 = 256 << 10;
    const STREAMS: u64 = 8;
    let server = TestServer::start(&[
        ("ADAPTERDROP__SERVER__MAX_MESSAGE_BYTES", &LIMIT.to_string()),
        ("ADAPTERDROP__LIMITS__MAX_CONCURRENT_STREAMS", &STREAMS.to_string()),
    ]);
    let channel = server.channel().await;
    let n = adapterdrop_serve::proto::inference_client::InferenceClient::new(channel.clone());
    let k = GrpcInferenceServiceClient::new(channel);
    n.clone().infer(native("sent", vec!["warm up".into()], false)).await.expect("native");
    k.clone().model_infer(kserve(vec![tensor("TEXT", "BYTES", &[1])], vec![raw_text(b"warm up")])).await.expect("KServe");
    let (_, base) = memory(server.pid());

    // 16 over-limit messages per API at once (1 MiB each; KServe used to accept 2 GiB).
    let big = vec![b'a'; MIB as usize];
    let mut calls = Vec::new();
    for _ in 0..16 {
        let (mut n, mut k, text) = (n.clone(), k.clone(), String::from_utf8(big.clone()).unwrap());
        let raw = raw_text(&big);
        calls.push(tokio::spawn(async move { n.infer(native("sent", vec![text], false)).await.map(|_| ()) }));
        calls.push(tokio::spawn(async move { k.model_infer(kserve(vec![tensor("TEXT", "BYTES", &[1])], vec![raw])).await.map(|_| ()) }));
    }
    for c in calls {
        let status = c.await.unwrap().expect_err("over the message limit");
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    }
    // Declared counts far beyond the bytes sent: the red-team requests.
    let declared = [
        kserve(vec![tensor("input_ids", "INT64", &[16_777_216, 0])], vec![vec![]]),
        kserve(vec![tensor("input_ids", "INT64", &[2_147_483_647, 0])], vec![vec![]]),
        kserve(vec![tensor("TEXT", "BYTES", &[2_147_483_647])], vec![vec![]]),
    ];
    for r in declared {
        assert_eq!(k.clone().model_infer(r).await.unwrap_err().code(), Code::InvalidArgument);
    }
    let huge_text = "word ".repeat(40_000);
    let status = n.clone().infer(native("sent", vec![huge_text], true)).await.unwrap_err();
    assert!(status.message().contains("limits.max_text_bytes"), "{status:?}");
    let (_, refused) = memory(server.pid());
    println!("over-limit and declared-count requests: VmHWM +{} MiB", (refused - base) / MIB);
    assert!(refused - base < 48 * MIB, "refused requests raised the peak by {} MiB", (refused - base) / MIB);

    // Messages just under the limit made of empty elements (empty bytes_contents entries: 2 bytes
    // on the wire, 24 once decoded; empty TokenIds: 72), 16 at once on one connection: the codec
    // refuses them from their wire bytes, so they cost what was received, not 12-36x that.
    let entries = (LIMIT as usize - 1024) / 2;
    let mut calls = Vec::new();
    for _ in 0..16 {
        let (mut k, mut n) = (k.clone(), n.clone());
        let mut t = tensor("TEXT", "BYTES", &[1]);
        t.contents = Some(InferTensorContents { bytes_contents: vec![Vec::new(); entries], ..Default::default() });
        calls.push(tokio::spawn(async move { k.model_infer(kserve(vec![t], vec![])).await.map(|_| ()) }));
        let sequences = vec![adapterdrop_serve::proto::TokenIds::default(); entries];
        let r = InferRequest {
            tasks: vec![TaskRef { name: "sent".into(), ..Default::default() }],
            inputs: Some(Inputs::Tokens(adapterdrop_serve::proto::TokenizedInputs { sequences })),
            ..Default::default()
        };
        calls.push(tokio::spawn(async move { n.infer(r).await.map(|_| ()) }));
    }
    for c in calls {
        let status = c.await.unwrap().unwrap_err();
        assert!(status.code() == Code::InvalidArgument && status.message().contains("hard ceiling"), "{status:?}");
    }
    let (_, empties) = memory(server.pid());
    // What was received (tonic's buffer and HTTP/2's) plus allocator slack.
    let bound = STREAMS * LIMIT * 3 + 8 * MIB;
    println!(
        "16 + 16 x {LIMIT}-byte messages of empty elements over {STREAMS} streams: VmHWM +{} MiB (bound {} MiB)",
        (empties - base) / MIB,
        bound / MIB
    );
    assert!(empties - base < bound, "peak +{} MiB over the bound {} MiB", (empties - base) / MIB, bound / MIB);
    // The worst shape the codec lets through: varint numbers of one byte each (an attention mask
    // of ones), 8 bytes each once decoded, in vectors that grow by doubling. The router refuses
    // them (too many tokens) after decoding.
    let mut calls = Vec::new();
    for _ in 0..16 {
        let mut n = n.clone();
        let ones = vec![1i64; LIMIT as usize - 1024];
        let sequences = vec![adapterdrop_serve::proto::TokenIds { input_ids: vec![], attention_mask: ones, token_type_ids: vec![] }];
        let r = InferRequest {
            tasks: vec![TaskRef { name: "sent".into(), ..Default::default() }],
            inputs: Some(Inputs::Tokens(adapterdrop_serve::proto::TokenizedInputs { sequences })),
            ..Default::default()
        };
        calls.push(tokio::spawn(async move { n.infer(r).await.map(|_| ()) }));
    }
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap_err().code(), Code::InvalidArgument);
    }
    let (_, numbers) = memory(server.pid());
    let bound = STREAMS * LIMIT * 18;
    println!(
        "16 x {LIMIT}-byte native messages of one-byte varints over {STREAMS} streams: VmHWM +{} MiB (bound {} MiB)",
        (numbers - base) / MIB,
        bound / MIB
    );
    assert!(numbers - base < bound, "peak +{} MiB over the documented bound {} MiB", (numbers - base) / MIB, bound / MIB);
    // Still serving.
    n.clone().infer(native("sent", vec!["still here".into()], false)).await.expect("native after");
}

/// One request larger than the batch budget takes its memory and gives it back afterwards
/// (ONNX Runtime arena shrinkage + heap trim); the arena used to keep its peak for good.
#[tokio::test]
async fn memory_of_a_large_batch_is_given_back() {
    let server = TestServer::start(&[("ADAPTERDROP__BATCHING__MAX_BATCH_TOKENS", "1024")]);
    let mut c = server.client().await;
    c.infer(native("mini-houlsby", vec!["warm up the sessions".into(); 2], false)).await.expect("warm-up");
    let (base, _) = memory(server.pid());
    let long = "the quick brown fox jumps over the lazy dog ".repeat(70);
    let out = c.infer(native("mini-houlsby", vec![long; 8], true)).await.expect("large batch").into_inner();
    assert_eq!(out.num_tokens, vec![512; 8]);
    let (after, peak) = memory(server.pid());
    println!("8 x 512 tokens on MiniLM: resident {} MiB before, peak {} MiB, {} MiB after", base / MIB, peak / MIB, after / MIB);
    assert!(peak - base > 100 * MIB, "the batch should need memory: peak +{} MiB", (peak - base) / MIB);
    assert!(
        after.saturating_sub(base) < (peak - base) / 4,
        "kept {} MiB of the {} MiB the batch took",
        after.saturating_sub(base) / MIB,
        (peak - base) / MIB
    );
    // And the next large request still works.
    c.infer(native("mini-houlsby", vec!["again".into(); 2], false)).await.expect("after");
}

/// Sends a pre-encoded message (any bytes) to a unary method; only the status matters here.
async fn raw_unary(channel: tonic::transport::Channel, path: &'static str, message: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static(path);
    match grpc.unary(tonic::Request::new(message), path, RawCodec).await {
        Ok(_) => tonic::Status::ok("answered"),
        Err(status) => status,
    }
}

/// Encodes `Vec<u8>` as it is; decodes answers as nothing.
#[derive(Clone, Copy)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = ();
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        bytes::Buf::advance(src, bytes::Buf::remaining(src));
        Ok(Some(()))
    }
}

/// Field `number` as a length-delimited field holding `payload`.
fn field(number: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 11);
    prost::encoding::encode_key(number.into(), prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(payload.len() as u64, &mut out);
    out.extend_from_slice(payload);
    out
}

/// `bytes` of `n`-fold empty field `number` (2 bytes each on the wire).
fn empties(number: u8, bytes: usize) -> Vec<u8> {
    field(number, &[]).repeat(bytes / 2)
}

/// Messages made of many empty elements (2 bytes on the wire, 24 to over 300 once decoded) are
/// refused from their wire bytes, before prost decodes them: the server's peak memory rises by
/// about the message itself, not by the 12-150x decoding would take. The red team's 63 MiB of
/// empty `TokenIds` cost +2.37 GB; here 16 MiB messages (the server accepts 17 MiB).
#[tokio::test]
async fn many_empty_elements_are_refused_before_decoding() {
    const SIZE: usize = 16 << 20;
    let server = TestServer::start(&[("ADAPTERDROP__SERVER__MAX_MESSAGE_BYTES", &(SIZE + (1 << 20)).to_string())]);
    let channel = server.channel().await;
    let mut n = adapterdrop_serve::proto::inference_client::InferenceClient::new(channel.clone());
    n.infer(native("sent", vec!["warm up".into()], false)).await.expect("native");
    let sent = field(1, &field(1, b"sent"));
    let model = field(1, b"sent");
    let text_input = [field(1, b"TEXT"), field(2, b"BYTES"), field(3, &[1]), field(5, &empties(8, SIZE))].concat();
    let cases: [(&str, &'static str, Vec<u8>, &str, usize); 5] = [
        (
            "native: empty TokenIds",
            "/adapterdrop.v1.Inference/Infer",
            [sent.clone(), field(4, &empties(1, SIZE))].concat(),
            "InferRequest.tokens.sequences",
            4096,
        ),
        (
            "native: empty task references",
            "/adapterdrop.v1.Inference/Infer",
            [empties(1, SIZE), field(2, &field(1, b"hi"))].concat(),
            "InferRequest.tasks",
            1024,
        ),
        (
            "KServe: empty InferInputTensors",
            "/inference.GRPCInferenceService/ModelInfer",
            [model.clone(), empties(5, SIZE)].concat(),
            "ModelInferRequest.inputs",
            64,
        ),
        (
            "KServe: empty bytes_contents",
            "/inference.GRPCInferenceService/ModelInfer",
            [model.clone(), field(5, &text_input)].concat(),
            "ModelInferRequest.inputs.contents.bytes_contents",
            8192,
        ),
        (
            "KServe: empty raw_input_contents",
            "/inference.GRPCInferenceService/ModelInfer",
            [model, empties(7, SIZE)].concat(),
            "ModelInferRequest.raw_input_contents",
            64,
        ),
    ];
    for (i, (what, path, message, field_path, ceiling)) in cases.into_iter().enumerate() {
        // `MEMORY_CASE=i` runs one case alone (each case's own peak, for docs/reliability.md).
        if std::env::var("MEMORY_CASE").is_ok_and(|only| only != i.to_string()) {
            continue;
        }
        let (_, base) = memory(server.pid());
        let bytes = message.len();
        let started = std::time::Instant::now();
        let status = raw_unary(channel.clone(), path, message).await;
        let (_, peak) = memory(server.pid());
        println!(
            "{what}: {} MiB message, VmHWM +{} MiB, {:?}: {:?} {}",
            bytes >> 20,
            peak.saturating_sub(base) / MIB,
            started.elapsed(),
            status.code(),
            status.message()
        );
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(status.message().contains(field_path) && status.message().contains(&format!("more than {ceiling}")), "{what}: {status:?}");
        // The received message itself (and HTTP/2's copy of it) is all it may cost.
        assert!(peak.saturating_sub(base) < 3 * SIZE as u64, "{what}: peak +{} MiB for a {} MiB message", (peak - base) / MIB, bytes >> 20);
    }
    n.infer(native("sent", vec!["still here".into()], false)).await.expect("native after");
}
