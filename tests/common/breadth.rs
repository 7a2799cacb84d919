//! The issue-14 library fixtures (`tests/fixtures/adapterhub-breadth`) and their exported
//! repository (`make breadth-repo`): paths, the library's recorded inputs and outputs, comparison.

use std::path::PathBuf;

use adapterdrop_serve::proto::TokenIds;
use serde_json::Value;

use super::{max_abs_diff, root};

/// Served = library within this, at every drop depth.
pub const TOL: f64 = 1e-4;
pub const BACKBONES: [&str; 5] = ["bert", "roberta", "xlm-roberta", "distilbert", "electra"];

pub fn breadth_repo() -> PathBuf {
    let p = std::env::var_os("ADAPTERDROP_BREADTH_REPO").map(PathBuf::from).unwrap_or_else(|| root().join("build/breadth-repo"));
    assert!(p.join("backbones/xlm-roberta/backbone.json").is_file(), "{} is missing: run `make breadth-repo` first", p.display());
    p
}

/// The library's AdapterHub directory of `task` on `backbone`.
pub fn adapter_dir(backbone: &str, task: &str) -> PathBuf {
    root().join("tests/fixtures/adapterhub-breadth").join(backbone).join("adapters").join(task)
}

pub fn reference(backbone: &str) -> Value {
    let path = root().join("tests/fixtures/adapterhub-breadth").join(backbone).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

pub fn ints(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// Unpadded sequences (the fixture pads to the longest); token types only where the library's
/// tokenizer returns them.
pub fn unpadded(inputs: &Value) -> Vec<TokenIds> {
    let ids = inputs["input_ids"].as_array().unwrap();
    (0..ids.len())
        .map(|r| {
            let n = ints(&inputs["attention_mask"][r]).iter().filter(|m| **m == 1).count();
            let take = |v: &Value| ints(v).into_iter().take(n).collect::<Vec<_>>();
            let types = inputs.get("token_type_ids").map(|t| take(&t[r])).unwrap_or_default();
            TokenIds { input_ids: take(&ids[r]), attention_mask: vec![1; n], token_type_ids: types }
        })
        .collect()
}

pub fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()
}

/// Asserts every row of `got` is within [`TOL`] of `want`; returns the largest difference.
pub fn assert_close(what: &str, got: &[Vec<f32>], want: &Value) -> f64 {
    let want = want.as_array().unwrap();
    assert_eq!(got.len(), want.len(), "{what}: row count");
    let mut worst = 0.0f64;
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        let w = floats(w);
        assert_eq!(g.len(), w.len(), "{what} row {r}: width");
        let d = max_abs_diff(g, &w);
        assert!(d <= TOL, "{what} row {r}: max abs diff {d:e} > {TOL:e}\n got  {g:?}\n want {w:?}");
        worst = worst.max(d);
    }
    worst
}
