//! `head_config.json` + `model_head.safetensors`: an AdapterHub prediction head as the library's
//! `PredictionHead.build` lays it out. For `layers` = L the modules are, in order, per layer a
//! dropout, a linear layer and (all but the last, when `activation_function` is set) the
//! activation, so the linear layers sit at module indices 1, 4, 7, ... (1, 3, 5, ... without an
//! activation) and their weights are `heads.<name>.<index>.weight` / `.bias`.

use std::path::Path;

use ndarray::{Array1, Array2};
use serde_json::Value;

use super::{
    Activation, AdapterHubError, HEAD_CONFIG, HEAD_WEIGHTS, HeadLayer, HeadWeights, check_tensor, invalid, read_json, read_safetensors,
    unsupported,
};
use crate::repository::manifest::HeadKind;

/// Most labels a head may have (the manifest's label list is echoed in every response).
const MAX_LABELS: usize = 65_536;
/// Most linear layers a head may have (each is `[H, H]`; the library's heads use 1 or 2).
const MAX_LAYERS: u64 = 16;
/// The head types the server computes, as `head_config.json` names them.
const SUPPORTED: &str = "classification, multilabel_classification, multiple_choice, tagging, question_answering";

pub fn load(dir: &Path, hidden: usize) -> Result<HeadWeights, AdapterHubError> {
    let path = dir.join(HEAD_CONFIG);
    let meta = read_json(&path)?;
    let name = meta.get("name").and_then(Value::as_str).ok_or_else(|| invalid(&path, "lacks 'name'"))?;
    let empty = serde_json::Map::new();
    let cfg = meta.get("config").and_then(Value::as_object).unwrap_or(&empty);
    let head_type = cfg.get("head_type").cloned().unwrap_or_default();
    // (kind before the regression check, default `layers`), as the library's head classes default them.
    let (kind, default_layers) = match head_type.as_str() {
        Some("classification") => (HeadKind::Classification, 2),
        // The classification head's layers; a sigmoid per label, or one logit per (context, choice) pair.
        Some("multilabel_classification") => (HeadKind::MultiLabel, 2),
        Some("multiple_choice") => (HeadKind::MultipleChoice, 2),
        Some("tagging") => (HeadKind::Tagging, 1),
        Some("question_answering") => (HeadKind::QuestionAnswering, 1),
        _ => return Err(unsupported(&path, format!("head_type={head_type} is not supported (one of {SUPPORTED})"))),
    };
    for (key, want) in [("use_pooler", Value::from(false)), ("multilabel", Value::from(false))] {
        if let Some(v) = cfg.get(key)
            && *v != want
        {
            return Err(unsupported(&path, format!("head {key}={v} is not supported (only {want})")));
        }
    }
    let layers = match cfg.get("layers") {
        None => default_layers,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=MAX_LAYERS).contains(n))
            .ok_or_else(|| invalid(&path, format!("layers={v} must be 1..={MAX_LAYERS}")))?,
    } as usize;
    let activation = match cfg.get("activation_function") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(v) => Some(v.as_str().map(str::to_lowercase).as_deref().and_then(Activation::parse).ok_or_else(|| {
            unsupported(
                &path,
                format!("head activation_function={v} is not supported (one of gelu, relu, sigmoid, silu, swish, tanh, or null)"),
            )
        })?),
    };
    let bias = match cfg.get("bias") {
        None => true,
        Some(v) => v.as_bool().ok_or_else(|| invalid(&path, format!("bias={v} is not a boolean")))?,
    };
    let num_labels = match cfg.get("num_labels") {
        _ if kind == HeadKind::MultipleChoice => 1,
        None => 2,
        Some(v) => v
            .as_u64()
            .filter(|&n| n >= 1 && n as usize <= MAX_LABELS)
            .ok_or_else(|| invalid(&path, format!("num_labels={v} must be 1..={MAX_LABELS}")))? as usize,
    };
    let kind = match kind {
        HeadKind::Classification if num_labels == 1 => HeadKind::Regression,
        HeadKind::QuestionAnswering if num_labels != 2 => {
            return Err(invalid(&path, format!("a question_answering head has num_labels=2 (start, end), not {num_labels}")));
        }
        HeadKind::Tagging if num_labels < 2 => return Err(invalid(&path, "a tagging head needs num_labels >= 2")),
        k => k,
    };
    let labels = match kind {
        HeadKind::Classification | HeadKind::Tagging | HeadKind::MultiLabel => labels(&path, cfg.get("label2id"), num_labels)?,
        HeadKind::Regression | HeadKind::QuestionAnswering | HeadKind::MultipleChoice | HeadKind::Embedding => Vec::new(),
    };
    let wpath = dir.join(HEAD_WEIGHTS);
    if !wpath.is_file() && dir.join("pytorch_model_head.bin").is_file() {
        return Err(invalid(
            &dir.join("pytorch_model_head.bin"),
            "a PyTorch pickle; the server reads safetensors only (model_head.safetensors)",
        ));
    }
    let mut tensors = read_safetensors(&wpath)?;
    let mut get = |k: String, shape: &[usize]| {
        let key = format!("heads.{name}.{k}");
        let t = tensors.remove(&key).ok_or_else(|| invalid(&wpath, format!("key '{key}' not found")))?;
        check_tensor(&wpath, &key, t, shape)
    };
    let mut out = Vec::with_capacity(layers);
    let mut module = 0;
    for l in 0..layers {
        let last = l + 1 == layers;
        module += 1; // the dropout before every linear layer
        let rows = if last { num_labels } else { hidden };
        let w = get(format!("{module}.weight"), &[rows, hidden])?;
        let b = if bias || !last { get(format!("{module}.bias"), &[rows])? } else { vec![0.0; rows] };
        let w = Array2::from_shape_vec((rows, hidden), w).map_err(|e| invalid(&wpath, e.to_string()))?;
        out.push(HeadLayer { w, b: Array1::from(b) });
        module += if !last && activation.is_some() { 2 } else { 1 };
    }
    Ok(HeadWeights { kind, labels, layers: out, activation })
}

/// Label names in label2id order (`LABEL_<i>` without a label2id).
fn labels(path: &Path, label2id: Option<&Value>, num_labels: usize) -> Result<Vec<String>, AdapterHubError> {
    let Some(map) = label2id.and_then(Value::as_object).filter(|m| !m.is_empty()) else {
        return Ok((0..num_labels).map(|i| format!("LABEL_{i}")).collect());
    };
    let mut pairs = Vec::with_capacity(map.len());
    for (label, id) in map {
        let id = id.as_i64().or_else(|| id.as_str().and_then(|s| s.parse().ok()));
        let id = id.ok_or_else(|| invalid(path, format!("label2id['{label}'] is not an integer")))?;
        pairs.push((id, label.clone()));
    }
    pairs.sort();
    if num_labels > 1 && pairs.len() != num_labels {
        return Err(invalid(path, format!("label2id has {} labels, num_labels is {num_labels}", pairs.len())));
    }
    Ok(pairs.into_iter().map(|(_, l)| l).collect())
}
