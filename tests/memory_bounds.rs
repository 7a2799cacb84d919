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
/// and accepted ones at most streams x message size x prost's decoding overhead.
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

    // Accepted sizes, worst shape: messages just under the limit made of empty bytes_contents
    // entries (2 bytes on the wire, 24 in memory once decoded), 16 at once on one connection.
    let entries = (LIMIT as usize - 1024) / 2;
    let mut calls = Vec::new();
    for _ in 0..16 {
        let mut k = k.clone();
        let mut t = tensor("TEXT", "BYTES", &[1]);
        t.contents = Some(InferTensorContents { bytes_contents: vec![Vec::new(); entries], ..Default::default() });
        calls.push(tokio::spawn(async move { k.model_infer(kserve(vec![t], vec![])).await.map(|_| ()) }));
    }
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap_err().code(), Code::InvalidArgument);
    }
    let (_, accepted) = memory(server.pid());
    let bound = STREAMS * LIMIT * 13;
    println!(
        "16 x {LIMIT}-byte KServe messages over {STREAMS} streams: VmHWM +{} MiB (bound {} MiB)",
        (accepted - base) / MIB,
        bound / MIB
    );
    assert!(accepted - base < bound, "peak +{} MiB over the documented bound {} MiB", (accepted - base) / MIB, bound / MIB);
    // The native API's worst shape: empty TokenIds (2 bytes on the wire, 72 once decoded).
    let mut calls = Vec::new();
    for _ in 0..16 {
        let mut n = n.clone();
        let sequences = vec![adapterdrop_serve::proto::TokenIds::default(); entries];
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
    let (_, native_peak) = memory(server.pid());
    let bound = STREAMS * LIMIT * 37;
    println!(
        "16 x {LIMIT}-byte native messages over {STREAMS} streams: VmHWM +{} MiB (bound {} MiB)",
        (native_peak - base) / MIB,
        bound / MIB
    );
    assert!(native_peak - base < bound, "peak +{} MiB over the documented bound {} MiB", (native_peak - base) / MIB, bound / MIB);
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
