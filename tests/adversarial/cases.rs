//! The table of hostile requests and the builders it uses.

use std::collections::HashMap;

use adapterdrop_serve::kserve_proto::infer_parameter::ParameterChoice;
use adapterdrop_serve::kserve_proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use adapterdrop_serve::kserve_proto::{InferParameter, InferTensorContents, ModelInferRequest};
use adapterdrop_serve::proto::{InferRequest, TaskRef, TextPair, TextPairs, Texts, TokenIds, TokenizedInputs, infer_request::Inputs};
use tonic::Code;

/// Settings of the server under test: small enough that over-limit requests stay cheap to build.
pub const MAX_MESSAGE: usize = 4 << 20;
pub const MAX_TOKENS: usize = 4096;

pub enum Call {
    Native(InferRequest),
    KServe(ModelInferRequest),
}

pub struct Case {
    pub what: &'static str,
    pub call: Call,
    pub code: Code,
    pub needle: &'static str,
}

pub fn native(tasks: &[&str], inputs: Option<Inputs>) -> InferRequest {
    InferRequest {
        tasks: tasks.iter().map(|t| TaskRef { name: t.to_string(), ..Default::default() }).collect(),
        inputs,
        ..Default::default()
    }
}

pub fn texts(t: &[&str]) -> Option<Inputs> {
    Some(Inputs::Texts(Texts { texts: t.iter().map(|s| s.to_string()).collect() }))
}

pub fn tokens(seqs: Vec<(Vec<i64>, Vec<i64>, Vec<i64>)>) -> Option<Inputs> {
    let sequences = seqs
        .into_iter()
        .map(|(input_ids, attention_mask, token_type_ids)| TokenIds { input_ids, attention_mask, token_type_ids })
        .collect();
    Some(Inputs::Tokens(TokenizedInputs { sequences }))
}

pub fn ids(v: Vec<i64>) -> Option<Inputs> {
    tokens(vec![(v, vec![], vec![])])
}

pub fn tensor(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
    InferInputTensor { name: name.into(), datatype: datatype.into(), shape: shape.to_vec(), ..Default::default() }
}

pub fn typed_text(shape: &[i64], items: Vec<Vec<u8>>) -> InferInputTensor {
    let mut t = tensor("TEXT", "BYTES", shape);
    t.contents = Some(InferTensorContents { bytes_contents: items, ..Default::default() });
    t
}

pub fn raw_elems(items: &[&[u8]]) -> Vec<u8> {
    items.iter().flat_map(|s| (s.len() as u32).to_le_bytes().into_iter().chain(s.iter().copied())).collect()
}

pub fn kserve(model: &str, inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>) -> ModelInferRequest {
    ModelInferRequest { model_name: model.into(), inputs, raw_input_contents: raw, ..Default::default() }
}

pub fn with_param(mut r: ModelInferRequest, key: &str, value: ParameterChoice) -> ModelInferRequest {
    r.parameters.insert(key.into(), InferParameter { parameter_choice: Some(value) });
    r
}

pub fn kserve_text(model: &str, text: &str) -> ModelInferRequest {
    kserve(model, vec![tensor("TEXT", "BYTES", &[1])], vec![raw_elems(&[text.as_bytes()])])
}

pub fn cases() -> Vec<Case> {
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
                tasks: vec![TaskRef { name: "sent".into(), version: Some(9), drop_first: None, ..Default::default() }],
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
            what: "many empty token sequences (refused from the wire bytes, before decoding)",
            call: Call::Native(native(&["sent"], tokens(vec![(vec![], vec![], vec![]); 100_000]))),
            code: Code::InvalidArgument,
            needle: "more than 4096 elements in `InferRequest.tokens.sequences`",
        },
        Case {
            what: "empty token sequences over the configured limit",
            call: Call::Native(native(&["sent"], tokens(vec![(vec![], vec![], vec![]); 300]))),
            code: Code::InvalidArgument,
            needle: "300 sequences exceed the limit of 256",
        },
        Case {
            what: "task references over the codec ceiling",
            call: Call::Native(native(&["sent"; 1025], texts(&["hi"]))),
            code: Code::InvalidArgument,
            needle: "more than 1024 elements in `InferRequest.tasks`",
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
                tasks: vec![TaskRef { name: "sent".into(), version: None, drop_first: Some(3), ..Default::default() }],
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
            what: "1.5 MB of empty bytes_contents (refused from the wire bytes, before decoding)",
            call: Call::KServe(kserve("sent", vec![typed_text(&[1], vec![vec![]; 750_000])], vec![])),
            code: Code::InvalidArgument,
            needle: "more than 8192 elements in `ModelInferRequest.inputs.contents.bytes_contents`",
        },
        Case {
            what: "more bytes_contents than the shape",
            call: Call::KServe(kserve("sent", vec![typed_text(&[1], vec![vec![]; 300])], vec![])),
            code: Code::InvalidArgument,
            needle: "holds 1 elements but contents.bytes_contents has 300",
        },
        Case {
            what: "65 empty KServe inputs",
            call: Call::KServe(kserve("sent", vec![Default::default(); 65], vec![])),
            code: Code::InvalidArgument,
            needle: "more than 64 elements in `ModelInferRequest.inputs`",
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
