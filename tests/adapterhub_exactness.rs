//! Served logits equal the AdapterHub `adapters` library's own logits at every drop depth, max abs
//! <= 1e-4 (saved with the fixtures in `tests/fixtures/adapterhub-tiny` by
//! tools/train/make_adapterhub_fixtures.py).

mod common;

use adapterdrop_serve::proto::{TextPair, TextPairs, Texts, TokenIds, TokenizedInputs, infer_request::Inputs};
use common::{TestServer, adapterhub_fixtures, infer_logits, max_abs_diff};
use serde_json::Value;

const TOL: f64 = 1e-4;

fn fixture(model: &str) -> Value {
    let path = adapterhub_fixtures().join(model).join("reference_logits.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// Unpadded token sequences from the fixture's padded ids and mask.
fn unpadded(ids: &Value, mask: &Value, types: Option<&Value>) -> Vec<TokenIds> {
    let rows = ids.as_array().unwrap();
    rows.iter()
        .enumerate()
        .map(|(r, row)| {
            let m: Vec<i64> = mask[r].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            let n = m.iter().filter(|v| **v == 1).count();
            let take = |v: &Value| v.as_array().unwrap().iter().take(n).map(|x| x.as_i64().unwrap()).collect::<Vec<_>>();
            TokenIds { input_ids: take(row), attention_mask: vec![1; n], token_type_ids: types.map(|t| take(&t[r])).unwrap_or_default() }
        })
        .collect()
}

fn expected(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()).collect()
}

fn assert_close(what: &str, got: &[Vec<f32>], want: &[Vec<f64>]) {
    assert_eq!(got.len(), want.len(), "{what}: row count");
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        let d = max_abs_diff(g, w);
        assert!(d <= TOL, "{what} row {r}: max abs diff {d:e} > {TOL:e}\n got  {g:?}\n want {w:?}");
    }
}

#[tokio::test]
async fn bert_tiny_matches_library_for_every_drop_depth() {
    let server = TestServer::start(&[]);
    let fx = fixture("bert-tiny");
    let texts: Vec<String> = fx["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    let ids = unpadded(&fx["input_ids"], &fx["attention_mask"], None);
    let pair_ids = unpadded(&fx["pair_input_ids"], &fx["pair_attention_mask"], Some(&fx["pair_token_type_ids"]));
    let pairs: Vec<TextPair> = fx["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| TextPair { text: p[0].as_str().unwrap().into(), text_pair: p[1].as_str().unwrap().into() })
        .collect();
    for task in ["sent", "topic", "score"] {
        for n in 0..=2u32 {
            let want = expected(&fx["logits"][task][n.to_string()]);
            let got = infer_logits(&server, task, n, Inputs::Tokens(TokenizedInputs { sequences: ids.clone() })).await;
            assert_close(&format!("{task} ids n={n}"), &got, &want);
            // Server-side tokenization must give the library's ids, hence the same logits.
            let got = infer_logits(&server, task, n, Inputs::Texts(Texts { texts: texts.clone() })).await;
            assert_close(&format!("{task} texts n={n}"), &got, &want);
            let want = expected(&fx["pair_logits"][task][n.to_string()]);
            let got = infer_logits(&server, task, n, Inputs::Tokens(TokenizedInputs { sequences: pair_ids.clone() })).await;
            assert_close(&format!("{task} pair ids n={n}"), &got, &want);
            let got = infer_logits(&server, task, n, Inputs::Pairs(TextPairs { pairs: pairs.clone() })).await;
            assert_close(&format!("{task} pairs n={n}"), &got, &want);
        }
    }
}

#[tokio::test]
async fn roberta_tiny_matches_library_for_every_drop_depth() {
    let server = TestServer::start(&[]);
    let fx = fixture("roberta-tiny");
    let ids = unpadded(&fx["input_ids"], &fx["attention_mask"], None);
    for n in 0..=2u32 {
        let want = expected(&fx["logits"]["sent"][n.to_string()]);
        let got = infer_logits(&server, "rsent", n, Inputs::Tokens(TokenizedInputs { sequences: ids.clone() })).await;
        assert_close(&format!("roberta sent n={n}"), &got, &want);
    }
}
