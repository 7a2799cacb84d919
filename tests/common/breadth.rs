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

/// KServe v2 as a Triton client sends it: `texts` as one BYTES `TEXT` input to `model`, fanned out
/// to the comma-separated `also` tasks; each `(output, fixture)` pair's two-class logits must equal
/// the library's at drop depth 0 (`fx["tasks"][fixture]`).
pub async fn assert_kserve_fan_out(server: &super::TestServer, fx: &Value, model: &str, also: &str, outputs: &[(&str, &str)]) {
    use std::collections::HashMap;

    use adapterdrop_serve::kserve_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
    use adapterdrop_serve::kserve_proto::infer_parameter::ParameterChoice;
    use adapterdrop_serve::kserve_proto::model_infer_request::InferInputTensor;
    use adapterdrop_serve::kserve_proto::{InferParameter, ModelInferRequest};

    let texts = strings(&fx["texts"]);
    let raw: Vec<u8> = texts.iter().flat_map(|t| (t.len() as u32).to_le_bytes().into_iter().chain(t.bytes())).collect();
    let text = InferInputTensor { name: "TEXT".into(), datatype: "BYTES".into(), shape: vec![texts.len() as i64, 1], ..Default::default() };
    let fan_out = InferParameter { parameter_choice: Some(ParameterChoice::StringParam(also.into())) };
    let req = ModelInferRequest {
        model_name: model.into(),
        inputs: vec![text],
        raw_input_contents: vec![raw],
        parameters: HashMap::from([("tasks".to_string(), fan_out)]),
        ..Default::default()
    };
    let resp = GrpcInferenceServiceClient::new(server.channel().await).model_infer(req).await.expect("KServe infer").into_inner();
    for (output, fixture) in outputs {
        let at = resp.outputs.iter().position(|o| o.name == *output).unwrap_or_else(|| panic!("no output {output}"));
        assert_eq!(resp.outputs[at].shape, vec![texts.len() as i64, 2], "{output}");
        let values: Vec<f32> = resp.raw_output_contents[at].chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let rows: Vec<Vec<f32>> = values.chunks(2).map(<[f32]>::to_vec).collect();
        assert_close(&format!("KServe {output}"), &rows, &fx["tasks"][fixture]["outputs"]["0"]["logits"]);
    }
}
