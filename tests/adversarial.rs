//! The adversarial table: hostile and malformed requests of many kinds, native and KServe, each
//! with the status it must get. After every one the server must still be up and answer a valid
//! request of each API exactly as before. Ends with what the requests must not have done to the
//! metrics (no series per client-chosen name) and a KServe deadline that must be counted.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::Duration;

use adapterdrop_serve::kserve_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use adapterdrop_serve::kserve_proto::infer_parameter::ParameterChoice;
use adapterdrop_serve::kserve_proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use adapterdrop_serve::kserve_proto::{InferParameter, InferTensorContents, ModelInferRequest};
use adapterdrop_serve::proto::inference_client::InferenceClient;
use adapterdrop_serve::proto::{InferRequest, TaskRef, TextPair, TextPairs, Texts, TokenIds, TokenizedInputs, infer_request::Inputs};
use common::TestServer;
use tonic::Code;
use tonic::transport::Channel;

/// Settings of the server under test: small enough that over-limit requests stay cheap to build.
const MAX_MESSAGE: usize = 4 << 20;
const MAX_TOKENS: usize = 4096;

enum Call {
    Native(InferRequest),
    KServe(ModelInferRequest),
}

struct Case {
    what: &'static str,
    call: Call,
    code: Code,
    needle: &'static str,
}

fn native(tasks: &[&str], inputs: Option<Inputs>) -> InferRequest {
    InferRequest {
        tasks: tasks.iter().map(|t| TaskRef { name: t.to_string(), ..Default::default() }).collect(),
        inputs,
        ..Default::default()
    }
}

fn texts(t: &[&str]) -> Option<Inputs> {
    Some(Inputs::Texts(Texts { texts: t.iter().map(|s| s.to_string()).collect() }))
}

fn tokens(seqs: Vec<(Vec<i64>, Vec<i64>, Vec<i64>)>) -> Option<Inputs> {
    let sequences = seqs
        .into_iter()
        .map(|(input_ids, attention_mask, token_type_ids)| TokenIds { input_ids, attention_mask, token_type_ids })
        .collect();
    Some(Inputs::Tokens(TokenizedInputs { sequences }))
}

fn ids(v: Vec<i64>) -> Option<Inputs> {
    tokens(vec![(v, vec![], vec![])])
}

fn tensor(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
    InferInputTensor { name: name.into(), datatype: datatype.into(), shape: shape.to_vec(), ..Default::default() }
}

fn typed_text(shape: &[i64], items: Vec<Vec<u8>>) -> InferInputTensor {
    let mut t = tensor("TEXT", "BYTES", shape);
    t.contents = Some(InferTensorContents { bytes_contents: items, ..Default::default() });
    t
}

fn raw_elems(items: &[&[u8]]) -> Vec<u8> {
    items.iter().flat_map(|s| (s.len() as u32).to_le_bytes().into_iter().chain(s.iter().copied())).collect()
}

fn kserve(model: &str, inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>) -> ModelInferRequest {
    ModelInferRequest { model_name: model.into(), inputs, raw_input_contents: raw, ..Default::default() }
}

fn with_param(mut r: ModelInferRequest, key: &str, value: ParameterChoice) -> ModelInferRequest {
    r.parameters.insert(key.into(), InferParameter { parameter_choice: Some(value) });
    r
}

fn kserve_text(model: &str, text: &str) -> ModelInferRequest {
    kserve(model, vec![tensor("TEXT", "BYTES", &[1])], vec![raw_elems(&[text.as_bytes()])])
}

fn cases() -> Vec<Case> {
    let long_name = "n".repeat(20_000);
    let words = "good ".repeat(62);
    let fan_out_texts: Vec<&str> = vec![words.as_str(); 40];
    let big_text = "word ".repeat(14_000);
    let mid_text = "word ".repeat(12_000);
    let mut c = vec![
        // --- native ---
        Case { what: "unknown task", call: Call::Native(native(&["nope"], texts(&["hi"]))), code: Code::NotFound, needle: "not found" },
        Case {
            what: "20 KB task name",
            call: Call::Native(native(&[&long_name], texts(&["hi"]))),
            code: Code::NotFound,
            needle: "(20000 bytes)` not found",
        },
        Case {
            what: "unknown version",
            call: Call::Native(InferRequest {
                tasks: vec![TaskRef { name: "sent".into(), version: Some(9), drop_first: None }],
                inputs: texts(&["hi"]),
                ..Default::default()
            }),
            code: Code::NotFound,
            needle: "no version 9",
        },
        Case {
            what: "version not a number",
            call: Call::Native(native(&["sent@x"], texts(&["hi"]))),
            code: Code::InvalidArgument,
            needle: "version",
        },
        Case { what: "no inputs", call: Call::Native(native(&["sent"], None)), code: Code::InvalidArgument, needle: "no inputs" },
        Case {
            what: "empty text list",
            call: Call::Native(native(&["sent"], texts(&[]))),
            code: Code::InvalidArgument,
            needle: "no inputs",
        },
        Case {
            what: "whitespace text",
            call: Call::Native(native(&["sent"], texts(&[" \t\n "]))),
            code: Code::InvalidArgument,
            needle: "is empty",
        },
        Case {
            what: "NUL and control characters only",
            call: Call::Native(native(&["sent"], texts(&["\0\0\u{1}\u{7f}"]))),
            code: Code::InvalidArgument,
            needle: "is empty",
        },
        Case {
            what: "zero-width characters only",
            call: Call::Native(native(&["sent"], texts(&["\u{200b}\u{feff}"]))),
            code: Code::InvalidArgument,
            needle: "no content",
        },
        Case {
            what: "a single [PAD] text",
            call: Call::Native(native(&["sent"], texts(&["[PAD]"]))),
            code: Code::InvalidArgument,
            needle: "no content",
        },
        Case {
            what: "pair with an empty half",
            call: Call::Native(native(
                &["sent"],
                Some(Inputs::Pairs(TextPairs { pairs: vec![TextPair { text: "a".into(), text_pair: "\0".into() }] })),
            )),
            code: Code::InvalidArgument,
            needle: "pair 0 has an empty text",
        },
        Case {
            what: "text over limits.max_text_bytes",
            call: Call::Native(native(&["sent"], texts(&[&big_text]))),
            code: Code::InvalidArgument,
            needle: "limits.max_text_bytes",
        },
        Case {
            what: "texts over limits.max_request_text_bytes together",
            call: Call::Native(native(&["sent"], texts(&[mid_text.as_str(); 20]))),
            code: Code::InvalidArgument,
            needle: "limits.max_request_text_bytes",
        },
        Case {
            what: "a single [PAD] id",
            call: Call::Native(native(&["sent"], ids(vec![0]))),
            code: Code::InvalidArgument,
            needle: "no content",
        },
        Case {
            what: "mask all zero",
            call: Call::Native(native(&["sent"], tokens(vec![(vec![101, 7, 102], vec![0, 0, 0], vec![])]))),
            code: Code::InvalidArgument,
            needle: "masks every token",
        },
        Case {
            what: "mask all zero after truncation",
            call: Call::Native(InferRequest {
                truncate: true,
                ..native(&["sent"], tokens(vec![(vec![7; 70], [vec![0; 64], vec![1; 6]].concat(), vec![])]))
            }),
            code: Code::InvalidArgument,
            needle: "that truncation keeps",
        },
        Case {
            what: "id >= vocab",
            call: Call::Native(native(&["sent"], ids(vec![101, 30522, 102]))),
            code: Code::InvalidArgument,
            needle: "outside the vocabulary",
        },
        Case {
            what: "negative id",
            call: Call::Native(native(&["sent"], ids(vec![101, -1, 102]))),
            code: Code::InvalidArgument,
            needle: "outside the vocabulary",
        },
        Case {
            what: "empty ids",
            call: Call::Native(native(&["sent"], ids(vec![]))),
            code: Code::InvalidArgument,
            needle: "input_ids is empty",
        },
        Case {
            what: "mask length",
            call: Call::Native(native(&["sent"], tokens(vec![(vec![101, 7, 102], vec![1], vec![])]))),
            code: Code::InvalidArgument,
            needle: "attention_mask has 1 entries",
        },
        Case {
            what: "token type out of range",
            call: Call::Native(native(&["sent"], tokens(vec![(vec![101, 7, 102], vec![], vec![0, 5, 0])]))),
            code: Code::InvalidArgument,
            needle: "token type 5",
        },
        Case {
            what: "many empty token sequences",
            call: Call::Native(native(&["sent"], tokens(vec![(vec![], vec![], vec![]); 100_000]))),
            code: Code::InvalidArgument,
            needle: "100000 sequences exceed the limit of 256",
        },
        Case {
            what: "too many tasks",
            call: Call::Native(native(&["sent"; 33], texts(&["hi"]))),
            code: Code::InvalidArgument,
            needle: "33 tasks exceed the limit of 32",
        },
        Case {
            what: "fan-out rows over the token limit",
            call: Call::Native(native(&["sent", "topic"], texts(&fan_out_texts))),
            code: Code::InvalidArgument,
            needle: "distinct task paths",
        },
        Case {
            what: "drop outside the robust range",
            call: Call::Native(InferRequest {
                tasks: vec![TaskRef { name: "sent".into(), version: None, drop_first: Some(3) }],
                inputs: texts(&["hi"]),
                ..Default::default()
            }),
            code: Code::InvalidArgument,
            needle: "robust range",
        },
        Case {
            what: "text to an id-only backbone",
            call: Call::Native(native(&["rsent"], texts(&["hi"]))),
            code: Code::FailedPrecondition,
            needle: "no tokenizer",
        },
        Case {
            what: "two backbones",
            call: Call::Native(native(&["sent", "rand-pfeiffer"], texts(&["hi"]))),
            code: Code::InvalidArgument,
            needle: "different backbones",
        },
        Case { what: "no task", call: Call::Native(native(&[], texts(&["hi"]))), code: Code::InvalidArgument, needle: "no task" },
        Case {
            what: "longer than the backbone",
            call: Call::Native(native(&["sent"], texts(&[&"word ".repeat(80)]))),
            code: Code::InvalidArgument,
            needle: "accepts at most 64",
        },
        Case {
            what: "native message over server.max_message_bytes",
            call: Call::Native(native(&["sent"], texts(&[&"a".repeat(MAX_MESSAGE + 1)]))),
            code: Code::OutOfRange,
            needle: "limit",
        },
        // --- KServe ---
        Case {
            what: "TEXT shape [2147483647] with one empty raw entry (aborted the process)",
            call: Call::KServe(kserve("sent", vec![tensor("TEXT", "BYTES", &[2147483647])], vec![vec![]])),
            code: Code::InvalidArgument,
            needle: "sequences exceed the limit",
        },
        Case {
            what: "input_ids shape [2147483647, 0] (aborted the process)",
            call: Call::KServe(kserve("sent", vec![tensor("input_ids", "INT64", &[2147483647, 0])], vec![vec![]])),
            code: Code::InvalidArgument,
            needle: "sequences exceed the limit",
        },
        Case {
            what: "input_ids shape [16777216, 0]",
            call: Call::KServe(kserve("sent", vec![tensor("input_ids", "INT64", &[16777216, 0])], vec![vec![]])),
            code: Code::InvalidArgument,
            needle: "sequences exceed the limit",
        },
        Case {
            what: "input_ids shape [1, 0]",
            call: Call::KServe(kserve("sent", vec![tensor("input_ids", "INT64", &[1, 0])], vec![vec![]])),
            code: Code::InvalidArgument,
            needle: "at least one token",
        },
        Case {
            what: "input_ids shape beyond any message",
            call: Call::KServe(kserve("sent", vec![tensor("input_ids", "INT64", &[256, 1 << 40])], vec![vec![]])),
            code: Code::InvalidArgument,
            needle: "is too large",
        },
        Case {
            what: "1.5 MB of empty bytes_contents",
            call: Call::KServe(kserve("sent", vec![typed_text(&[1], vec![vec![]; 750_000])], vec![])),
            code: Code::InvalidArgument,
            needle: "holds 1 elements but contents.bytes_contents has 750000",
        },
        Case {
            what: "raw BYTES encoding more elements than the shape",
            call: Call::KServe(kserve("sent", vec![tensor("TEXT", "BYTES", &[1])], vec![vec![0; 1 << 20]])),
            code: Code::InvalidArgument,
            needle: "encode more",
        },
        Case {
            what: "raw BYTES element longer than what remains",
            call: Call::KServe(kserve("sent", vec![tensor("TEXT", "BYTES", &[1])], vec![vec![255, 255, 255, 127, b'x']])),
            code: Code::InvalidArgument,
            needle: "only 1 remain",
        },
        Case {
            what: "negative shape",
            call: Call::KServe(kserve("sent", vec![tensor("TEXT", "BYTES", &[-1])], vec![vec![]])),
            code: Code::InvalidArgument,
            needle: "non-negative",
        },
        Case {
            what: "rank 5 shape",
            call: Call::KServe(kserve("sent", vec![tensor("TEXT", "BYTES", &[1, 1, 1, 1, 1])], vec![raw_elems(&[b"a"])])),
            code: Code::InvalidArgument,
            needle: "(5 dimensions)",
        },
        Case {
            what: "wrong datatype",
            call: Call::KServe(kserve("sent", vec![tensor("TEXT", "FP32", &[1])], vec![vec![0; 4]])),
            code: Code::InvalidArgument,
            needle: "must be BYTES",
        },
        Case {
            what: "raw INT64 length vs shape",
            call: Call::KServe(kserve("sent", vec![tensor("input_ids", "INT64", &[1, 3])], vec![vec![0; 16]])),
            code: Code::InvalidArgument,
            needle: "24 bytes",
        },
        Case {
            what: "text over limits.max_text_bytes",
            call: Call::KServe(kserve_text("sent", &big_text)),
            code: Code::InvalidArgument,
            needle: "limits.max_text_bytes",
        },
        Case { what: "NUL-only text", call: Call::KServe(kserve_text("sent", "\0\0\0")), code: Code::InvalidArgument, needle: "is empty" },
        Case { what: "[PAD] text", call: Call::KServe(kserve_text("sent", "[PAD]")), code: Code::InvalidArgument, needle: "no content" },
        Case {
            what: "invalid UTF-8 text",
            call: Call::KServe(kserve("sent", vec![tensor("TEXT", "BYTES", &[1])], vec![raw_elems(&[&[0xff, 0xfe]])])),
            code: Code::InvalidArgument,
            needle: "not valid UTF-8",
        },
        Case { what: "unknown model", call: Call::KServe(kserve_text("nope", "hi")), code: Code::NotFound, needle: "not found" },
        Case {
            what: "20 KB model name",
            call: Call::KServe(kserve_text(&long_name, "hi")),
            code: Code::NotFound,
            needle: "(20000 bytes)` not found",
        },
        Case {
            what: "model version not a number",
            call: Call::KServe(ModelInferRequest { model_version: "x".repeat(20_000), ..kserve_text("sent", "hi") }),
            code: Code::InvalidArgument,
            needle: "is not a number",
        },
        Case {
            what: "100k entries in the tasks parameter",
            call: Call::KServe(with_param(
                kserve_text("sent", "hi"),
                "tasks",
                ParameterChoice::StringParam((0..100_000).map(|i| format!("t{i}")).collect::<Vec<_>>().join(",")),
            )),
            code: Code::InvalidArgument,
            needle: "names 100000 tasks",
        },
        Case {
            what: "a task listed twice",
            call: Call::KServe(with_param(kserve_text("sent", "hi"), "tasks", ParameterChoice::StringParam("topic,topic".into()))),
            code: Code::InvalidArgument,
            needle: "listed twice",
        },
        Case {
            what: "unknown parameter with a 20 KB name",
            call: Call::KServe(with_param(kserve_text("sent", "hi"), &long_name, ParameterChoice::BoolParam(true))),
            code: Code::InvalidArgument,
            needle: "(20000 bytes)",
        },
        Case {
            what: "negative timeout parameter",
            call: Call::KServe(with_param(kserve_text("sent", "hi"), "timeout", ParameterChoice::Int64Param(-1))),
            code: Code::InvalidArgument,
            needle: "must not be negative",
        },
        Case {
            what: "classification extension",
            call: Call::KServe(ModelInferRequest {
                outputs: vec![InferRequestedOutputTensor {
                    name: "label".into(),
                    parameters: HashMap::from([(
                        "classification".to_string(),
                        InferParameter { parameter_choice: Some(ParameterChoice::Int64Param(2)) },
                    )]),
                }],
                ..kserve_text("sent", "hi")
            }),
            code: Code::InvalidArgument,
            needle: "classification extension",
        },
        Case {
            what: "unknown output",
            call: Call::KServe(ModelInferRequest {
                outputs: vec![InferRequestedOutputTensor { name: "embedding".into(), ..Default::default() }],
                ..kserve_text("sent", "hi")
            }),
            code: Code::InvalidArgument,
            needle: "unknown output",
        },
        Case {
            what: "KServe message over server.max_message_bytes (was 2 GiB)",
            call: Call::KServe(kserve_text("sent", &"a".repeat(MAX_MESSAGE + 1))),
            code: Code::OutOfRange,
            needle: "limit",
        },
    ];
    c.shrink_to_fit();
    c
}

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
