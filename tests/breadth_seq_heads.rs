//! Issue 14, sequence heads: multiple choice, multi-label classification and every backbone's
//! built-in embedding task, served exactly like the AdapterHub `adapters` library computes them at
//! every drop depth (`tests/fixtures/adapterhub-breadth/<backbone>/reference.json`), for all five
//! backbones, alone and beside other tasks in one request; and all-MiniLM-L6-v2's embedding equal to
//! the published sentence-transformers one. Bad input: one choice, too many, a threshold outside
//! 0..=1 or for another head, a multiple-choice task without choices.

mod admin_support;
mod common;

use adapterdrop_serve::proto::{
    AdapterHubTask, BundleHeader, ChoiceInput, Choices, GetTaskRequest, InferRequest, InferResponse, ListTasksRequest, TaskRef, TaskStatus,
    Texts, TokenizedInputs, infer_request::Inputs,
};
use common::breadth::{BACKBONES, TOL, assert_close, breadth_repo, floats, reference, strings, unpadded};
use common::{TestServer, copy_dir};
use serde_json::Value;
use tonic::Code;

fn task(name: &str, drop_first: Option<u32>, threshold: Option<f32>) -> TaskRef {
    TaskRef { name: name.into(), drop_first, threshold, ..Default::default() }
}

fn request(tasks: Vec<TaskRef>, inputs: Inputs) -> InferRequest {
    InferRequest { tasks, inputs: Some(inputs), ..Default::default() }
}

async fn infer(server: &TestServer, req: InferRequest) -> Result<InferResponse, tonic::Status> {
    server.client().await.infer(req).await.map(|r| r.into_inner())
}

fn texts(fx: &Value) -> Inputs {
    Inputs::Texts(Texts { texts: strings(&fx["texts"]) })
}

/// The fixture's multiple-choice items: `[context, [choices]]`.
fn choice_items(fx: &Value) -> Vec<ChoiceInput> {
    fx["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ChoiceInput { context: c[0].as_str().unwrap().into(), choices: strings(&c[1]) })
        .collect()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn column<'a>(
    resp: &'a InferResponse,
    i: usize,
    pick: impl Fn(&'a adapterdrop_serve::proto::SequenceResult) -> &'a Vec<f32>,
) -> Vec<Vec<f32>> {
    resp.results[i].sequences.iter().map(|s| pick(s).clone()).collect()
}

/// Every backbone's `<backbone>/embedding` is the plain backbone's mean-pooled last hidden state
/// (the fixtures' checkpoints carry no sentence-transformers config: mean, not normalised), from
/// texts and from ids, alone and in one request beside a classifier and a multi-label task at every
/// drop depth, each of which stays exact.
#[tokio::test]
async fn embeddings_and_multilabel_match_the_library_alone_and_together() {
    let server = TestServer::start_on(&breadth_repo(), &[]);
    let mut worst = 0.0f64;
    for b in BACKBONES {
        let fx = reference(b);
        let emb = format!("{b}/embedding");
        let want_emb = &fx["embedding"]["mean"];
        let ids = Inputs::Tokens(TokenizedInputs { sequences: unpadded(&fx["inputs"]["texts"]) });
        for inputs in [texts(&fx), ids] {
            let r = infer(&server, request(vec![task(&emb, None, None)], inputs)).await.unwrap();
            assert!(r.results[0].sequences.iter().all(|s| s.logits.is_empty() && s.label_index == -1));
            worst = worst.max(assert_close(&emb, &column(&r, 0, |s| &s.embedding), want_emb));
        }
        for n in 0..=fx["num_layers"].as_u64().unwrap() as u32 {
            let tasks = vec![
                task(&format!("{b}-multilabel"), Some(n), None),
                task(&emb, None, None),
                task(&format!("{b}-pfeiffer"), Some(n), None),
            ];
            let r = infer(&server, request(tasks, texts(&fx))).await.unwrap();
            let want = &fx["tasks"]["multilabel"]["outputs"][n.to_string()]["logits"];
            worst = worst.max(assert_close(&format!("{b}-multilabel n={n}"), &column(&r, 0, |s| &s.logits), want));
            worst = worst.max(assert_close(&format!("{emb} beside n={n}"), &column(&r, 1, |s| &s.embedding), want_emb));
            let want_cls = &fx["tasks"]["pfeiffer"]["outputs"][n.to_string()]["logits"];
            worst = worst.max(assert_close(&format!("{b}-pfeiffer n={n}"), &column(&r, 2, |s| &s.logits), want_cls));
            assert_eq!(r.results[0].dropped_layers, (0..n).collect::<Vec<_>>());
            // Sigmoid scores; the labels strictly above the default threshold 0.5, in label order.
            for (seq, w) in r.results[0].sequences.iter().zip(want.as_array().unwrap()) {
                let w = floats(w);
                let scores: Vec<f64> = w.iter().map(|x| sigmoid(*x)).collect();
                assert!(seq.scores.iter().zip(&scores).all(|(g, s)| (f64::from(*g) - s).abs() <= TOL), "{seq:?}");
                let above: Vec<i32> = (0..scores.len()).filter(|&i| scores[i] > 0.5).map(|i| i as i32).collect();
                assert_eq!((seq.label_indices.clone(), seq.threshold, seq.label_index), (above.clone(), 0.5, -1));
                let names: Vec<String> = above.iter().map(|&i| format!("topic{i}")).collect();
                assert_eq!(seq.labels, names);
            }
        }
    }
    eprintln!("embeddings + multilabel: worst max abs diff {worst:e}");
}

/// A request's threshold replaces the task's; it must be within 0..=1 and name a multi-label task.
#[tokio::test]
async fn multilabel_threshold_per_request_and_bad_thresholds() {
    let server = TestServer::start_on(&breadth_repo(), &[]);
    let fx = reference("bert");
    let want = &fx["tasks"]["multilabel"]["outputs"]["0"]["logits"];
    for t in [0.0f32, 0.7, 1.0] {
        let r = infer(&server, request(vec![task("bert-multilabel", Some(0), Some(t))], texts(&fx))).await.unwrap();
        for (seq, w) in r.results[0].sequences.iter().zip(want.as_array().unwrap()) {
            let above: Vec<i32> =
                floats(w).iter().enumerate().filter(|(_, x)| sigmoid(**x) > f64::from(t)).map(|(i, _)| i as i32).collect();
            assert_eq!((seq.label_indices.clone(), seq.threshold), (above, t), "threshold {t}");
        }
    }
    for (name, t, says) in [
        ("bert-multilabel", 1.5, "within 0..=1"),
        ("bert-multilabel", -0.1, "within 0..=1"),
        ("bert-multilabel", f32::NAN, "within 0..=1"),
        ("bert-pfeiffer", 0.5, "for multi-label tasks"),
        ("bert/embedding", 0.5, "for multi-label tasks"),
    ] {
        let e = infer(&server, request(vec![task(name, None, Some(t))], texts(&fx))).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name} {t}: {e:?}");
        assert!(e.message().contains("threshold") && e.message().contains(says), "{name} {t}: {}", e.message());
    }
}

/// A multiple-choice item is k (context, choice) pairs through the backbone; the result is one per
/// item: a logit per choice (the library's), their softmax, the best choice's index and text.
#[tokio::test]
async fn multiple_choice_matches_the_library_and_bad_items_are_refused() {
    let server = TestServer::start_on(&breadth_repo(), &[]);
    let mut worst = 0.0f64;
    for b in BACKBONES {
        let fx = reference(b);
        let items = choice_items(&fx);
        let name = format!("{b}-choice");
        for n in 0..=fx["num_layers"].as_u64().unwrap() as u32 {
            // Beside the embedding task, which gets one result per (context, choice) pair.
            let tasks = vec![task(&name, Some(n), None), task(&format!("{b}/embedding"), None, None)];
            let r = infer(&server, request(tasks, Inputs::Choices(Choices { items: items.clone() }))).await.unwrap();
            let want = &fx["tasks"]["choice"]["outputs"][n.to_string()]["logits"];
            worst = worst.max(assert_close(&format!("{name} n={n}"), &column(&r, 0, |s| &s.logits), want));
            assert_eq!(r.results[1].sequences.len(), 6, "the embedding of every pair");
            assert_eq!(r.num_tokens.len(), 6);
            for ((seq, w), item) in r.results[0].sequences.iter().zip(want.as_array().unwrap()).zip(&items) {
                let w = floats(w);
                let best = (0..w.len()).fold(0, |b, i| if w[i] > w[b] { i } else { b });
                assert_eq!((seq.label_index, seq.label.as_str()), (best as i32, item.choices[best].as_str()));
                assert!((seq.scores.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
        }
    }
    eprintln!("multiple choice: worst max abs diff {worst:e}");
    let fx = reference("bert");
    let one = vec![choice_items(&fx)[0].clone(), ChoiceInput { context: "q".into(), choices: vec!["only".into()] }];
    let many = vec![ChoiceInput { context: "q".into(), choices: (0..65).map(|i| format!("c{i}")).collect() }];
    let none = vec![ChoiceInput { context: "q".into(), choices: vec![] }];
    for (items, says) in [
        (one, "inputs.choices.items[1].choices has 1 choice"),
        (many, "at most 64"),
        (none, "inputs.choices.items[0].choices has 0 choices"),
    ] {
        let e = infer(&server, request(vec![task("bert-choice", None, None)], Inputs::Choices(Choices { items }))).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(says), "{}", e.message());
    }
    let e = infer(&server, request(vec![task("bert-choice", None, None)], texts(&fx))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("multiple-choice task") && e.message().contains("inputs.choices"), "{}", e.message());
    let e = infer(&server, request(vec![task("bert-choice", None, None)], Inputs::Choices(Choices { items: vec![] }))).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("no inputs"), "{e:?}");
}

/// The built-in task is listed (ListTasks, GetTask), has no other version, no drop override, and
/// pools as `backbone.json` says: CLS and L2-normalised here.
#[tokio::test]
async fn embedding_is_listed_and_pools_as_the_manifest_says() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    copy_dir(&breadth_repo().join("backbones/bert"), &repo.join("backbones/bert"));
    std::fs::create_dir_all(repo.join("tasks")).unwrap();
    admin_support::edit_json(&repo.join("backbones/bert/backbone.json"), |m| {
        m["embedding"] = serde_json::json!({"pooling": "cls", "normalize": true});
    });
    let server = TestServer::start_on(repo, &[]);
    let fx = reference("bert");
    let r = infer(&server, request(vec![task("bert/embedding", None, None)], texts(&fx))).await.unwrap();
    let want: Vec<Value> = fx["embedding"]["cls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let v = floats(row);
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            Value::from(v.iter().map(|x| x / norm).collect::<Vec<_>>())
        })
        .collect();
    assert_close("bert/embedding cls", &column(&r, 0, |s| &s.embedding), &Value::from(want));
    let mut c = server.client().await;
    let listed = c.list_tasks(ListTasksRequest {}).await.unwrap().into_inner().tasks;
    let info = listed.iter().find(|t| t.name == "bert/embedding").expect("listed");
    assert_eq!(
        (info.status, info.head_type.as_str(), info.version, info.is_default_version),
        (TaskStatus::Ready as i32, "embedding", 1, true)
    );
    assert!(info.description.contains("CLS pooling, L2-normalised"), "{}", info.description);
    let got = c.get_task(GetTaskRequest { name: "bert/embedding".into(), version: None }).await.unwrap().into_inner();
    assert_eq!(got.backbone, "bert");
    let e =
        infer(&server, request(vec![TaskRef { version: Some(2), ..task("bert/embedding", None, None) }], texts(&fx))).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = infer(&server, request(vec![task("bert/embedding", Some(1), None)], texts(&fx))).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("omit drop_first"), "{e:?}");
    // The admin service cannot remove it: it has no files.
    let mut a = admin_support::admin(&server.admin_addr()).await;
    let e = admin_support::unregister(&mut a, "bert/embedding", None).await.unwrap_err();
    assert!(e.code() == Code::FailedPrecondition && e.message().contains("built-in embedding task"), "{e:?}");
}

/// Multi-label and multiple-choice adapters register weights-only (the four AdapterHub files, the
/// threshold in the header) and serve the library's numbers at every drop depth.
#[tokio::test]
async fn multilabel_and_choice_register_weights_only() {
    use adapterdrop_serve::proto::{DropConfig, RobustRange, drop_config::Mode};
    use admin_support::{admin, header, register};
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    copy_dir(&breadth_repo().join("backbones/roberta"), &repo.join("backbones/roberta"));
    std::fs::create_dir_all(repo.join("tasks")).unwrap();
    let server = TestServer::start_on(repo, &[]);
    let mut a = admin(&server.admin_addr()).await;
    let fixtures = common::root().join("tests/fixtures/adapterhub-breadth/roberta");
    let fx = reference("roberta");
    let drop = Some(DropConfig { mode: Some(Mode::Robust(RobustRange { default: 0, min: 0, max: 3 })) });
    let hub = |threshold| AdapterHubTask { backbone: "roberta".into(), drop: drop.clone(), threshold, ..Default::default() };
    let h = |name: &str, threshold| BundleHeader { adapterhub: Some(hub(threshold)), ..header(name, None, true, false) };
    let e = register(&mut a, h("w-choice", Some(0.5)), &fixtures.join("adapters/choice")).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("not multilabel"), "{e:?}");
    let e = register(&mut a, h("w-multi", Some(2.0)), &fixtures.join("adapters/multilabel")).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("within 0..=1"), "{e:?}");
    register(&mut a, h("w-multi", Some(0.8)), &fixtures.join("adapters/multilabel")).await.unwrap();
    register(&mut a, h("w-choice", None), &fixtures.join("adapters/choice")).await.unwrap();
    // A tagger labels one text: it cannot run beside a multiple-choice task on (context, choice) pairs.
    register(&mut a, h("w-tagging", None), &fixtures.join("adapters/tagging")).await.unwrap();
    let items = Inputs::Choices(Choices { items: choice_items(&fx) });
    let e = infer(&server, request(vec![task("w-choice", None, None), task("w-tagging", None, None)], items)).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("a tagger labels the tokens of one text"), "{e:?}");
    for n in 0..=3u32 {
        let r = infer(&server, request(vec![task("w-multi", Some(n), None)], texts(&fx))).await.unwrap();
        assert_close(
            &format!("w-multi n={n}"),
            &column(&r, 0, |s| &s.logits),
            &fx["tasks"]["multilabel"]["outputs"][n.to_string()]["logits"],
        );
        assert!(r.results[0].sequences.iter().all(|s| s.threshold == 0.8), "the task's own threshold");
        let items = Inputs::Choices(Choices { items: choice_items(&fx) });
        let r = infer(&server, request(vec![task("w-choice", Some(n), None)], items)).await.unwrap();
        assert_close(&format!("w-choice n={n}"), &column(&r, 0, |s| &s.logits), &fx["tasks"]["choice"]["outputs"][n.to_string()]["logits"]);
    }
}

/// all-MiniLM-L6-v2's built-in embedding (mean pooling + Normalize, from the sentence-transformers
/// config the exporter carried into backbone.json) equals the published embedding of "This is an
/// example sentence", whose first four values the model card and tools/tests/test_minilm.py give.
#[tokio::test]
async fn minilm_embedding_is_the_published_sentence_transformers_one() {
    const PUBLISHED: [f64; 4] = [0.0676569, 0.0634960, 0.0487131, 0.0793050];
    let server = TestServer::start(&[]);
    let texts = Inputs::Texts(Texts { texts: vec!["This is an example sentence".into(), "a second, longer sentence in the batch".into()] });
    let r = infer(&server, request(vec![task("minilm/embedding", None, None), task("mini-pfeiffer", None, None)], texts)).await.unwrap();
    let e = &r.results[0].sequences[0].embedding;
    assert_eq!(e.len(), 384);
    let d = common::max_abs_diff(&e[..4], &PUBLISHED);
    assert!(d <= 1e-5, "{:?} vs {PUBLISHED:?}: {d:e}", &e[..4]);
    eprintln!("minilm/embedding vs the published values: max abs diff {d:e}");
    let norm = e.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "normalised: {norm}");
}

/// The embedding task shares the trunk: beside a task that drops every layer and one that drops
/// two of three, one request of 4 texts runs each layer once on 4 rows (12 layer rows, where three
/// separate requests would run 36), and the engine counts the 24 rows it saved.
#[tokio::test]
async fn embedding_shares_the_trunk_with_adapter_tasks() {
    let server = TestServer::start_on(&breadth_repo(), &[]);
    let fx = reference("bert");
    let count = |name: &str| common::metric_sum(&common::scrape(&server.metrics_addr), name, "");
    let (rows, saved) = (count("adapterdrop_layer_rows_total"), count("adapterdrop_trunk_rows_saved_total"));
    let tasks = vec![task("bert/embedding", None, None), task("bert-pfeiffer", Some(3), None), task("bert-multilabel", Some(2), None)];
    let r = infer(&server, request(tasks, texts(&fx))).await.unwrap();
    assert_close("bert/embedding", &column(&r, 0, |s| &s.embedding), &fx["embedding"]["mean"]);
    assert_eq!(count("adapterdrop_layer_rows_total") - rows, 12.0);
    assert_eq!(count("adapterdrop_trunk_rows_saved_total") - saved, 24.0);
}

/// With `engine.banks = false` the same tasks run on the per-task segment path (exported head graphs,
/// the embedding over the plain slot graphs) and serve the same numbers.
#[tokio::test]
async fn the_segment_path_serves_the_same_numbers() {
    let server = TestServer::start_on(&breadth_repo(), &[("ADAPTERDROP__ENGINE__BANKS", "false")]);
    let fx = reference("electra");
    let tasks = vec![task("electra/embedding", None, None), task("electra-multilabel", Some(1), None)];
    let r = infer(&server, request(tasks, texts(&fx))).await.unwrap();
    assert_close("electra/embedding", &column(&r, 0, |s| &s.embedding), &fx["embedding"]["mean"]);
    assert_close("electra-multilabel n=1", &column(&r, 1, |s| &s.logits), &fx["tasks"]["multilabel"]["outputs"]["1"]["logits"]);
    let items = Inputs::Choices(Choices { items: choice_items(&fx) });
    let r = infer(&server, request(vec![task("electra-choice", Some(2), None)], items)).await.unwrap();
    assert_close("electra-choice n=2", &column(&r, 0, |s| &s.logits), &fx["tasks"]["choice"]["outputs"]["2"]["logits"]);
}
