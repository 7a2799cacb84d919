//! `head_config.json` + `model_head.safetensors`: AdapterHub's two-layer classification head
//! (`heads.<name>.1` dense, tanh, `heads.<name>.4` out projection); one label is regression.

use std::path::Path;

use ndarray::{Array1, Array2};
use serde_json::Value;

use super::{AdapterHubError, HEAD_CONFIG, HEAD_WEIGHTS, HeadWeights, check_tensor, invalid, read_json, read_safetensors, unsupported};
use crate::repository::manifest::HeadKind;

/// Most labels a head may have (the manifest's label list is echoed in every response).
const MAX_LABELS: usize = 65_536;

pub fn load(dir: &Path, hidden: usize) -> Result<HeadWeights, AdapterHubError> {
    let path = dir.join(HEAD_CONFIG);
    let meta = read_json(&path)?;
    let name = meta.get("name").and_then(Value::as_str).ok_or_else(|| invalid(&path, "lacks 'name'"))?;
    let empty = serde_json::Map::new();
    let cfg = meta.get("config").and_then(Value::as_object).unwrap_or(&empty);
    // Multi-label and multiple-choice heads are the same two layers as classification; they
    // differ in what is made of the logits (sigmoid per label; softmax over an input's choices).
    let head_type = cfg.get("head_type").and_then(Value::as_str);
    let family = match head_type {
        Some("classification") => HeadKind::Classification,
        Some("multilabel_classification") => HeadKind::MultiLabel,
        Some("multiple_choice") => HeadKind::MultipleChoice,
        _ => {
            return Err(unsupported(
                &path,
                format!(
                    "head_type={} is not supported (classification, multilabel_classification, multiple_choice)",
                    cfg.get("head_type").cloned().unwrap_or_default()
                ),
            ));
        }
    };
    let checks = [
        ("layers", Value::from(2)),
        ("activation_function", Value::from("tanh")),
        ("use_pooler", Value::from(false)),
        ("multilabel", Value::from(false)),
        ("bias", Value::from(true)),
    ];
    for (key, want) in checks {
        if let Some(v) = cfg.get(key)
            && *v != want
        {
            return Err(unsupported(&path, format!("head {key}={v} is not supported (only {want})")));
        }
    }
    let num_labels = match cfg.get("num_labels") {
        // A multiple-choice head scores one (context, choice) pair per row: one logit.
        _ if family == HeadKind::MultipleChoice => 1,
        None => 2,
        Some(v) => v
            .as_u64()
            .filter(|&n| n >= 1 && n as usize <= MAX_LABELS)
            .ok_or_else(|| invalid(&path, format!("num_labels={v} must be 1..={MAX_LABELS}")))? as usize,
    };
    let labels = if family == HeadKind::MultipleChoice { Vec::new() } else { labels(&path, cfg.get("label2id"), num_labels)? };
    let wpath = dir.join(HEAD_WEIGHTS);
    if !wpath.is_file() && dir.join("pytorch_model_head.bin").is_file() {
        return Err(invalid(
            &dir.join("pytorch_model_head.bin"),
            "a PyTorch pickle; the server reads safetensors only (model_head.safetensors)",
        ));
    }
    let mut tensors = read_safetensors(&wpath)?;
    let mut get = |k: &str, shape: &[usize]| {
        let key = format!("heads.{name}.{k}");
        let t = tensors.remove(&key).ok_or_else(|| invalid(&wpath, format!("key '{key}' not found")))?;
        check_tensor(&wpath, &key, t, shape)
    };
    let w1 = get("1.weight", &[hidden, hidden])?;
    let b1 = get("1.bias", &[hidden])?;
    let w2 = get("4.weight", &[num_labels, hidden])?;
    let b2 = get("4.bias", &[num_labels])?;
    let shape_err = |e: ndarray::ShapeError| invalid(&wpath, e.to_string());
    Ok(HeadWeights {
        kind: match family {
            HeadKind::Classification if num_labels == 1 => HeadKind::Regression,
            kind => kind,
        },
        labels: if num_labels == 1 && family == HeadKind::Classification { Vec::new() } else { labels },
        w1: Array2::from_shape_vec((hidden, hidden), w1).map_err(shape_err)?,
        b1: Array1::from(b1),
        w2: Array2::from_shape_vec((num_labels, hidden), w2).map_err(shape_err)?,
        b2: Array1::from(b2),
    })
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
