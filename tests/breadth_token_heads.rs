//! Issue 14, token heads: AdapterHub tagging and extractive-QA heads, registered at run time from
//! the library's own files (weights-only), served exactly like the `adapters` library computes
//! them at every drop depth on all five backbones, in one request beside a classification task
//! (sharing the trunk). Expected values: the library's outputs in
//! `tests/fixtures/adapterhub-breadth/<backbone>/reference.json`; character offsets and words: the
//! library tokenizer's `offsets` and `word_ids` recorded there; QA context tokens: the backbone's
//! tokenizer.json read here with the `tokenizers` crate. Spans and labels must match exactly.

mod admin_support;
mod common;

use std::path::PathBuf;

use adapterdrop_serve::proto::{
    InferRequest, InferResponse, TaskRef, TextPair, TextPairs, Texts, TokenIds, TokenizedInputs, infer_request::Inputs,
};
use admin_support::{admin, messages, register_msgs, robust, weights_header};
use common::{TestServer, copy_dir, max_abs_diff, root};
use serde_json::Value;
use tonic::Code;

const TOL: f64 = 1e-4;
const BACKBONES: [&str; 5] = ["bert", "roberta", "xlm-roberta", "distilbert", "electra"];
/// The library's default for `max_answer_len` in the SQuAD recipes, and the server's.
const MAX_ANSWER: usize = 30;

fn fixtures(backbone: &str) -> PathBuf {
    root().join("tests/fixtures/adapterhub-breadth").join(backbone)
}

fn reference(backbone: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures(backbone).join("reference.json")).unwrap()).unwrap()
}

/// A private repository: the breadth repository's backbones and `<b>-pfeiffer` tasks.
fn repo() -> tempfile::TempDir {
    let src = std::env::var_os("ADAPTERDROP_BREADTH_REPO").map(PathBuf::from).unwrap_or_else(|| root().join("build/breadth-repo"));
    assert!(src.join("backbones/bert/backbone.json").is_file(), "{} is missing: run `make breadth-repo` first", src.display());
    let dir = tempfile::tempdir().unwrap();
    for b in BACKBONES {
        copy_dir(&src.join("backbones").join(b), &dir.path().join("backbones").join(b));
        let t = format!("{b}-pfeiffer");
        copy_dir(&src.join("tasks").join(&t), &dir.path().join("tasks").join(&t));
    }
    dir
}

/// The server on a private repository, with `<b>-tagging` and `<b>-qa` of every backbone
/// registered from the library's files (robust drop 0..=3); also the admin address.
async fn serve() -> (tempfile::TempDir, TestServer, String) {
    let dir = repo();
    let server = TestServer::start_on(dir.path(), &[("ADAPTERDROP__REPOSITORY__POLL_INTERVAL_S", "0")]);
    let admin_addr = server.admin_addr();
    let mut a = admin(&admin_addr).await;
    for b in BACKBONES {
        for fixture in ["tagging", "qa"] {
            let files = fixtures(b).join("adapters").join(fixture);
            let name = format!("{b}-{fixture}");
            let resp = register_msgs(&mut a, messages(weights_header(&name, b, robust(0, 0, 3)), &files, 1 << 20), None).await;
            let info = resp.unwrap_or_else(|s| panic!("{name}: {s}")).task.unwrap();
            assert_eq!(info.head_type, if fixture == "qa" { "question_answering" } else { "tagging" }, "{name}");
        }
    }
    (dir, server, admin_addr)
}

fn task(name: &str, n: u32) -> TaskRef {
    TaskRef { name: name.into(), version: None, drop_first: Some(n), ..Default::default() }
}

async fn infer(server: &TestServer, req: InferRequest) -> InferResponse {
    server.client().await.infer(req).await.unwrap_or_else(|s| panic!("{s}")).into_inner()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// Index of the largest value, when it beats the runner-up by more than the tolerance allows to flip.
fn clear_argmax(v: &[f64]) -> Option<usize> {
    let best = (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b]))?;
    v.iter().enumerate().all(|(i, x)| i == best || v[best] - x > 4.0 * TOL).then_some(best)
}

fn chars(s: &str, start: u32, end: u32) -> String {
    s.chars().skip(start as usize).take((end - start) as usize).collect()
}

/// The library's best span: over context tokens s <= e < s + MAX_ANSWER, by start + end logit;
/// `None` when the runner-up is within the tolerance. Returns (start token, end token).
fn best_span(start: &[f64], end: &[f64], context: &[bool]) -> Option<(usize, usize)> {
    let mut spans: Vec<(f64, usize, usize)> = Vec::new();
    for s in (0..start.len()).filter(|&s| context[s]) {
        for e in (s..start.len().min(s + MAX_ANSWER)).filter(|&e| context[e]) {
            spans.push((start[s] + end[e], s, e));
        }
    }
    spans.sort_by(|a, b| b.0.total_cmp(&a.0));
    (spans.len() == 1 || spans[0].0 - spans[1].0 > 4.0 * TOL).then_some((spans[0].1, spans[0].2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagging_and_qa_match_the_library_at_every_drop_depth() {
    let (_dir, server, _) = serve().await;
    let (mut worst, mut labels, mut spans) = (0.0f64, 0, 0);
    for b in BACKBONES {
        let fx = reference(b);
        let texts: Vec<String> = fx["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().into()).collect();
        let offsets = &fx["inputs"]["texts"]["offsets"];
        let word_ids = &fx["inputs"]["texts"]["word_ids"];
        let tokenizer = tokenizers::Tokenizer::from_file(fixtures(b).join("backbone/tokenizer.json")).unwrap();
        for n in 0..=3u32 {
            // Tagging beside sequence classification, one request.
            let req = InferRequest {
                tasks: vec![task(&format!("{b}-tagging"), n), task(&format!("{b}-pfeiffer"), n)],
                inputs: Some(Inputs::Texts(Texts { texts: texts.clone() })),
                ..Default::default()
            };
            let resp = infer(&server, req).await;
            let out = &fx["tasks"]["tagging"]["outputs"][n.to_string()]["logits"];
            for (r, seq) in resp.results[0].sequences.iter().enumerate() {
                let what = format!("{b}-tagging n={n} text {r}");
                let len = seq.tokens.len();
                assert_eq!(len, resp.num_tokens[r] as usize, "{what}");
                let want: Vec<Vec<f64>> = (0..len).map(|t| floats(&out[r][t])).collect();
                let d = max_abs_diff(&seq.logits, &want.concat());
                assert!(d <= TOL, "{what}: logits differ by {d:e}");
                worst = worst.max(d);
                for (t, tok) in seq.tokens.iter().enumerate() {
                    let off = floats(&offsets[r][t]);
                    assert_eq!((tok.start, tok.end), (off[0] as u32, off[1] as u32), "{what} token {t}");
                    assert_eq!(tok.text, chars(&texts[r], tok.start, tok.end), "{what} token {t}");
                    assert_eq!(tok.special, word_ids[r][t].is_null(), "{what} token {t}");
                    if let Some(best) = clear_argmax(&want[t]) {
                        assert_eq!(tok.label_index as usize, best, "{what} token {t}");
                        labels += 1;
                    }
                }
                // Words: first sub-token per word (the library's word_ids), range over all of them.
                let mut words: Vec<(usize, u32, u32)> = Vec::new();
                for t in 0..len {
                    let Some(w) = word_ids[r][t].as_u64() else { continue };
                    let off = floats(&offsets[r][t]);
                    match words.get_mut(w as usize) {
                        Some(word) => word.2 = off[1] as u32,
                        None => words.push((t, off[0] as u32, off[1] as u32)),
                    }
                }
                assert_eq!(seq.words.len(), words.len(), "{what}: words");
                for (w, (word, &(first, start, end))) in seq.words.iter().zip(&words).enumerate() {
                    assert_eq!(
                        (word.start, word.end, word.label.as_str()),
                        (start, end, seq.tokens[first].label.as_str()),
                        "{what} word {w}"
                    );
                }
                for e in &seq.entities {
                    assert_eq!(e.text, chars(&texts[r], e.start, e.end), "{what}");
                    let first = &seq.words[e.first_word as usize].label;
                    assert!(first.ends_with(&format!("-{}", e.r#type)), "{what}: entity {e:?} starts at a {first} word");
                }
            }
            let want = &fx["tasks"]["pfeiffer"]["outputs"][n.to_string()]["logits"];
            for (r, seq) in resp.results[1].sequences.iter().enumerate() {
                let d = max_abs_diff(&seq.logits, &floats(&want[r]));
                assert!(d <= TOL, "{b}-pfeiffer n={n} text {r} beside the tagger: {d:e}");
            }

            // Extractive QA on (question, context) pairs.
            let pairs: Vec<(String, String)> =
                fx["pairs"].as_array().unwrap().iter().map(|p| (p[0].as_str().unwrap().into(), p[1].as_str().unwrap().into())).collect();
            let req = InferRequest {
                tasks: vec![task(&format!("{b}-qa"), n)],
                inputs: Some(Inputs::Pairs(TextPairs {
                    pairs: pairs.iter().map(|(q, c)| TextPair { text: q.clone(), text_pair: c.clone() }).collect(),
                })),
                n_best: Some(3),
                ..Default::default()
            };
            let resp = infer(&server, req).await;
            let out = &fx["tasks"]["qa"]["outputs"][n.to_string()];
            for (r, seq) in resp.results[0].sequences.iter().enumerate() {
                let what = format!("{b}-qa n={n} pair {r}");
                let enc = tokenizer.encode_char_offsets((pairs[r].0.as_str(), pairs[r].1.as_str()), true).unwrap();
                let len = enc.len();
                let (start, end) = (floats(&out["start_logits"][r])[..len].to_vec(), floats(&out["end_logits"][r])[..len].to_vec());
                let want: Vec<f64> = start.iter().zip(&end).flat_map(|(s, e)| [*s, *e]).collect();
                let d = max_abs_diff(&seq.logits, &want);
                assert!(d <= TOL, "{what}: start/end logits differ by {d:e}");
                worst = worst.max(d);
                let special = enc.get_special_tokens_mask();
                let context: Vec<bool> = (0..len).map(|t| special[t] == 0 && enc.get_sequence_ids()[t] == Some(1)).collect();
                assert!(!seq.answers.is_empty() && seq.answers.len() <= 3, "{what}");
                assert!(seq.answers.windows(2).all(|a| a[0].score >= a[1].score), "{what}: best first");
                let best = &seq.answers[0];
                assert_eq!(best.text, chars(&pairs[r].1, best.start, best.end), "{what}");
                let (s, e) = (best.start_token as usize, best.end_token as usize);
                assert!((best.score as f64 - (start[s] + end[e])).abs() <= 2.0 * TOL, "{what}: score");
                if let Some((s, e)) = best_span(&start, &end, &context) {
                    let offs = enc.get_offsets();
                    assert_eq!((best.start, best.end), (offs[s].0 as u32, offs[e].1 as u32), "{what}: the library's best span");
                    spans += 1;
                }
            }
        }
    }
    assert!(labels > 100 && spans >= 20, "too few clear decisions to compare: {labels} labels, {spans} spans");
    eprintln!("token heads: worst max abs diff {worst:e}; {labels} token labels and {spans} answer spans equal the library's");
}

/// A context longer than the backbone is split into windows sharing `doc_stride` tokens; the best
/// span over all windows wins, and each answer's score is its window's start + end logit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_contexts_are_split_into_windows_and_bad_requests_name_the_field() {
    let (_dir, server, admin_addr) = serve().await;
    let fx = reference("bert");
    let question = fx["pairs"][0][0].as_str().unwrap().to_string();
    let filler = "the weather stayed calm while people walked along the river and talked about books. ";
    let context = format!("{}{}{}", filler.repeat(3), fx["pairs"][0][1].as_str().unwrap(), filler.repeat(3));
    let pair = |c: &str| Some(Inputs::Pairs(TextPairs { pairs: vec![TextPair { text: question.clone(), text_pair: c.into() }] }));
    let req = InferRequest {
        tasks: vec![task("bert-qa", 1)],
        inputs: pair(&context),
        doc_stride: Some(8),
        n_best: Some(5),
        ..Default::default()
    };
    let resp = infer(&server, req).await;
    let windows = &resp.num_tokens;
    assert!(windows.len() >= 3 && windows.iter().all(|&w| w <= 64), "windows {windows:?}");
    let seq = &resp.results[0].sequences[0];
    assert_eq!(seq.logits.len(), 2 * windows.iter().sum::<u32>() as usize);
    let starts: Vec<usize> = windows.iter().scan(0, |acc, &w| Some(std::mem::replace(acc, *acc + w as usize))).collect();
    for a in &seq.answers {
        assert_eq!(a.text, chars(&context, a.start, a.end));
        let base = 2 * starts[a.window as usize];
        let score = seq.logits[base + 2 * a.start_token as usize] + seq.logits[base + 2 * a.end_token as usize + 1];
        assert!((a.score - score).abs() <= 1e-5, "{a:?} vs {score}");
    }
    assert!(seq.answers.windows(2).all(|a| a[0].score >= a[1].score && (a[0].start, a[0].end) != (a[1].start, a[1].end)));

    let mut c = server.client().await;
    let texts = |t: &[&str]| Some(Inputs::Texts(Texts { texts: t.iter().map(|s| s.to_string()).collect() }));
    let ids = Some(Inputs::Tokens(TokenizedInputs { sequences: vec![TokenIds { input_ids: vec![2, 40, 3], ..Default::default() }] }));
    let cases: Vec<(&str, InferRequest, &str)> = vec![
        (
            "qa without a context",
            InferRequest { tasks: vec![task("bert-qa", 0)], inputs: texts(&["who?"]), ..Default::default() },
            "text_pair",
        ),
        (
            "qa with an empty context",
            InferRequest { tasks: vec![task("bert-qa", 0)], inputs: pair(" "), ..Default::default() },
            "inputs.pairs[0].text_pair",
        ),
        (
            "tagging from ids",
            InferRequest { tasks: vec![task("bert-tagging", 0)], inputs: ids.clone(), ..Default::default() },
            "inputs.texts",
        ),
        ("tagging on pairs", InferRequest { tasks: vec![task("bert-tagging", 0)], inputs: pair("a b"), ..Default::default() }, "one text"),
        ("qa from ids", InferRequest { tasks: vec![task("bert-qa", 0)], inputs: ids, ..Default::default() }, "inputs.pairs"),
        (
            "n_best 0",
            InferRequest { tasks: vec![task("bert-qa", 0)], inputs: pair("a b"), n_best: Some(0), ..Default::default() },
            "n_best 0",
        ),
        (
            "n_best 21",
            InferRequest { tasks: vec![task("bert-qa", 0)], inputs: pair("a b"), n_best: Some(21), ..Default::default() },
            "n_best 21",
        ),
        (
            "max_answer_length 0",
            InferRequest { tasks: vec![task("bert-qa", 0)], inputs: pair("a b"), max_answer_length: Some(0), ..Default::default() },
            "max_answer_length 0",
        ),
        (
            "doc_stride past the window",
            InferRequest { tasks: vec![task("bert-qa", 0)], inputs: pair(&context), doc_stride: Some(4_000_000_000), ..Default::default() },
            "doc_stride 4000000000",
        ),
        (
            "windows beside a classifier",
            InferRequest { tasks: vec![task("bert-qa", 0), task("bert-pfeiffer", 0)], inputs: pair(&context), ..Default::default() },
            "bert-pfeiffer",
        ),
    ];
    for (what, req, needle) in cases {
        let s = c.infer(req).await.expect_err(what);
        assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
        assert!(s.message().contains(needle), "{what}: {}", s.message());
    }
    // A task's own default answer length, set at registration; refused for other heads or out of range.
    let mut a = admin(&admin_addr).await;
    let qa = fixtures("bert").join("adapters/qa");
    let with_max = |name: &str, m: u32| {
        let mut h = weights_header(name, "bert", robust(0, 0, 3));
        h.adapterhub.as_mut().unwrap().max_answer_length = Some(m);
        h
    };
    register_msgs(&mut a, messages(with_max("bert-qa-one", 1), &qa, 1 << 20), None).await.unwrap();
    let req = InferRequest { tasks: vec![task("bert-qa-one", 0)], inputs: pair(&context), n_best: Some(4), ..Default::default() };
    let one = infer(&server, req).await;
    assert!(one.results[0].sequences[0].answers.iter().all(|a| a.start_token == a.end_token));
    for (name, m, dir, needle) in [
        ("bert-tag-max", 5, fixtures("bert").join("adapters/tagging"), "is for question_answering heads"),
        ("bert-qa-zero", 0, qa.clone(), "max_answer_length 0 must be 1..=64"),
    ] {
        let s = register_msgs(&mut a, messages(with_max(name, m), &dir, 1 << 20), None).await.expect_err(name);
        assert_eq!(s.code(), Code::InvalidArgument, "{name}: {s:?}");
        assert!(s.message().contains(needle), "{name}: {}", s.message());
    }
    // Still serving.
    let req = InferRequest { tasks: vec![task("bert-qa", 0)], inputs: pair(fx["pairs"][0][1].as_str().unwrap()), ..Default::default() };
    assert_eq!(infer(&server, req).await.results[0].sequences[0].answers.len(), 1);
}
