//! Every kind of bad request gets a precise gRPC status, and the server keeps serving.

mod common;

use adapterdrop_serve::proto::{
    GetTaskRequest, InferRequest, TaskRef, TextPair, TextPairs, Texts, TokenIds, TokenizedInputs, infer_request::Inputs,
};
use common::TestServer;
use tonic::Code;

fn req(task: &str, version: Option<u32>, drop_first: Option<u32>, inputs: Option<Inputs>) -> InferRequest {
    InferRequest {
        tasks: vec![TaskRef { name: task.into(), version, drop_first, ..Default::default() }],
        inputs,
        truncate: false,
        return_fusion_weights: false,
        id: String::new(),
        ..Default::default()
    }
}

fn texts(t: &[&str]) -> Option<Inputs> {
    Some(Inputs::Texts(Texts { texts: t.iter().map(|s| s.to_string()).collect() }))
}

fn ids(seqs: Vec<TokenIds>) -> Option<Inputs> {
    Some(Inputs::Tokens(TokenizedInputs { sequences: seqs }))
}

fn tok(input_ids: Vec<i64>, attention_mask: Vec<i64>) -> TokenIds {
    TokenIds { input_ids, attention_mask, token_type_ids: vec![] }
}

#[tokio::test]
async fn bad_requests_get_actionable_statuses_and_the_server_stays_up() {
    let server = TestServer::start(&[
        ("ADAPTERDROP__LIMITS__MAX_SEQUENCES_PER_REQUEST", "4"),
        ("ADAPTERDROP__LIMITS__MAX_TOKENS_PER_REQUEST", "70"),
        ("ADAPTERDROP__LIMITS__MAX_TASKS_PER_REQUEST", "3"),
    ]);
    let mut c = server.client().await;
    let long = "word ".repeat(80);
    let twenty = "one two three four five six seven eight nine ten ".repeat(2);
    let cases: Vec<(&str, InferRequest, Code, &str)> = vec![
        ("unknown task", req("nope", None, None, texts(&["hi"])), Code::NotFound, "task `nope` not found"),
        ("unknown version", req("sent", Some(9), None, texts(&["hi"])), Code::NotFound, "no version 9"),
        ("no inputs", req("sent", None, None, None), Code::InvalidArgument, "no inputs"),
        ("empty list", req("sent", None, None, texts(&[])), Code::InvalidArgument, "no inputs"),
        ("empty text", req("sent", None, None, texts(&["fine", "  "])), Code::InvalidArgument, "text 1 is empty"),
        (
            "empty pair text",
            req("sent", None, None, Some(Inputs::Pairs(TextPairs { pairs: vec![TextPair { text: "a".into(), text_pair: "".into() }] }))),
            Code::InvalidArgument,
            "pair 0",
        ),
        (
            "id >= vocab",
            req("sent", None, None, ids(vec![tok(vec![101, 30522, 102], vec![])])),
            Code::InvalidArgument,
            "outside the vocabulary",
        ),
        (
            "negative id",
            req("sent", None, None, ids(vec![tok(vec![101, -1, 102], vec![])])),
            Code::InvalidArgument,
            "outside the vocabulary",
        ),
        (
            "mask length",
            req("sent", None, None, ids(vec![tok(vec![101, 7, 102], vec![1, 1])])),
            Code::InvalidArgument,
            "attention_mask has 2 entries",
        ),
        ("empty ids", req("sent", None, None, ids(vec![tok(vec![], vec![])])), Code::InvalidArgument, "input_ids is empty"),
        (
            "drop outside robust range",
            req("sent", None, Some(3), texts(&["hi"])),
            Code::InvalidArgument,
            "outside task `sent`'s robust range 0..=2",
        ),
        ("drop on a fixed task", req("sent-spec", None, Some(0), texts(&["hi"])), Code::InvalidArgument, "is not robust"),
        (
            "too many sequences",
            req("sent", None, None, texts(&["a", "b", "c", "d", "e"])),
            Code::InvalidArgument,
            "5 sequences exceed the limit of 4",
        ),
        (
            "too many tokens",
            req("sent", None, None, texts(&[&twenty, &twenty, &twenty, &twenty])),
            Code::InvalidArgument,
            "88 tokens exceed the limit of 70",
        ),
        ("longer than the backbone", req("sent", None, None, texts(&[&long])), Code::InvalidArgument, "accepts at most 64"),
        ("text to an id-only backbone", req("rsent", None, None, texts(&["hi"])), Code::FailedPrecondition, "has no tokenizer"),
        (
            "tasks on two backbones",
            InferRequest {
                tasks: vec![
                    TaskRef { name: "sent".into(), ..Default::default() },
                    TaskRef { name: "rand-pfeiffer".into(), ..Default::default() },
                ],
                inputs: texts(&["hi"]),
                truncate: false,
                return_fusion_weights: false,
                id: String::new(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "different backbones",
        ),
        (
            "too many tasks",
            InferRequest {
                tasks: vec![TaskRef { name: "sent".into(), ..Default::default() }; 4],
                inputs: texts(&["hi"]),
                truncate: false,
                return_fusion_weights: false,
                id: String::new(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "4 tasks exceed the limit of 3",
        ),
        (
            "no task",
            InferRequest {
                tasks: vec![],
                inputs: texts(&["hi"]),
                truncate: false,
                return_fusion_weights: false,
                id: String::new(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "no task",
        ),
    ];
    for (what, r, code, needle) in cases {
        let status = c.infer(r).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {}", status.message());
        assert!(status.message().contains(needle), "{what}: message `{}` lacks `{needle}`", status.message());
    }
    let missing = c.get_task(GetTaskRequest { name: "nope".into(), version: None }).await.expect_err("get unknown");
    assert_eq!(missing.code(), Code::NotFound);

    // Still serving, and truncation on request cuts instead of rejecting.
    let mut truncated = req("sent", None, None, texts(&[&long]));
    truncated.truncate = true;
    let ok = c.infer(truncated).await.expect("truncate").into_inner();
    assert_eq!(ok.num_tokens, vec![64]);
    let ok = c.infer(req("sent", None, None, texts(&["Ünïcödé, 日本語のテキスト, emoji 🎬🍿 work"]))).await.expect("unicode").into_inner();
    let scores = &ok.results[0].sequences[0].scores;
    assert!((scores.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    assert!(["negative", "positive"].contains(&ok.results[0].sequences[0].label.as_str()));
}
