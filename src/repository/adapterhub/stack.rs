//! `Stack(lower, task)` (MAD-X, issue 14 item 4): a language adapter under a task adapter. The
//! task version's AdapterHub directory holds the task adapter as usual and the lower adapter's
//! `adapter_config.json` + `adapter.safetensors` under `stack/`. On the adapter banks the lower
//! adapter runs first at every slot of the task's row, without the final LayerNorm (the library's
//! `Stack` hands its output on before it), and its invertible adapter ("nice", if the config has
//! one) runs on the embeddings at every drop depth (it is not a layer): on ELECTRA on the states
//! before `embeddings_project` (`embedding_size` wide; the backbone's `embeddings_project.onnx`
//! follows it).

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{Array1, Array2, ArrayViewMut2, Axis, s};
use serde_json::Value;

use super::safetensors::Tensor;
use super::types::{Activation, BottleneckWeights, SlotRule};
use super::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterHubError, check_tensor, invalid, read_json, unsupported};
use crate::repository::manifest::{Architecture, BackboneManifest, Location};

/// Directory of the lower adapter inside a task's AdapterHub directory.
pub const STACK_DIR: &str = "stack";
/// The files of the lower adapter (it has no head).
pub const STACK_FILES: [&str; 2] = [ADAPTER_CONFIG, ADAPTER_WEIGHTS];

/// The lower adapter of a `Stack`, validated against the backbone and the task adapter.
#[derive(Debug, Clone)]
pub struct StackLower {
    pub name: String,
    pub rule: SlotRule,
    pub slots: BTreeMap<(usize, Location), BottleneckWeights>,
    pub invertible: Option<Invertible>,
}

/// One `nn.Linear` (torch layout `w [out, in]`).
#[derive(Debug, Clone)]
struct Linear {
    w: Array2<f32>,
    b: Array1<f32>,
}

impl Linear {
    fn apply(&self, x: ndarray::ArrayView2<'_, f32>) -> Array2<f32> {
        x.dot(&self.w.t()) + &self.b
    }
}

/// The library's NICE coupling block at the embeddings: `x = [x1, x2]` split at `H / 2`,
/// `y1 = x1 + F(x2)`, `y2 = x2 + G(y1)`, `F` and `G` two linears with the adapter's activation.
#[derive(Debug, Clone)]
pub struct Invertible {
    f: [Linear; 2],
    g: [Linear; 2],
    activation: Activation,
}

impl Invertible {
    /// The forward pass on `[tokens, H]` states, in place.
    pub fn apply(&self, mut x: ArrayViewMut2<'_, f32>) {
        let half = x.len_of(Axis(1)) / 2;
        let mlp = |z: ndarray::ArrayView2<'_, f32>, l: &[Linear; 2]| {
            let mut m = l[0].apply(z);
            m.mapv_inplace(|v| activate(v, self.activation));
            l[1].apply(m.view())
        };
        let d1 = mlp(x.slice(s![.., half..]), &self.f);
        let mut x1 = x.slice_mut(s![.., ..half]);
        x1 += &d1;
        let d2 = mlp(x.slice(s![.., ..half]), &self.g);
        let mut x2 = x.slice_mut(s![.., half..]);
        x2 += &d2;
    }
}

fn activate(v: f32, a: Activation) -> f32 {
    match a {
        Activation::Relu => v.max(0.0),
        Activation::Silu => v / (1.0 + (-v).exp()),
        Activation::Gelu => {
            let x = f64::from(v);
            (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
        }
        Activation::Tanh => v.tanh(),
        Activation::Sigmoid => 1.0 / (1.0 + (-v).exp()),
    }
}

/// erf (Abramowitz-Stegun 7.1.26 is too coarse for 1e-4 on large activations, so a series /
/// continued fraction pair accurate to ~1e-12).
fn erf(x: f64) -> f64 {
    if x.abs() < 2.5 {
        // Maclaurin series.
        let (mut sum, mut term, mut n) = (x, x, 0.0f64);
        while term.abs() > 1e-17 * sum.abs().max(1e-300) {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
            if n > 200.0 {
                break;
            }
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        // Continued fraction for erfc.
        let z = x.abs();
        let mut f = 0.0;
        for k in (1..=60).rev() {
            f = (k as f64 / 2.0) / (z + f);
        }
        let erfc = (-z * z).exp() / std::f64::consts::PI.sqrt() / (z + f);
        (1.0 - erfc).copysign(x)
    }
}

/// Reads and checks the lower adapter under `task_dir/stack/` for a task adapter with bottleneck
/// slots `task_slots` (its rule `task_rule`, `task_method`) on backbone `m`.
pub fn load_lower(
    task_dir: &Path,
    m: &BackboneManifest,
    task_method: &str,
    task_rule: &SlotRule,
    task_slots: &BTreeMap<(usize, Location), BottleneckWeights>,
) -> Result<StackLower, AdapterHubError> {
    let dir = task_dir.join(STACK_DIR);
    let config_path = dir.join(ADAPTER_CONFIG);
    if task_rule.parallel || task_slots.is_empty() {
        return Err(unsupported(
            &config_path,
            format!("Stack over a {task_method} task adapter is not supported (a sequential bottleneck adapter: seq_bn, double_seq_bn)"),
        ));
    }
    let meta = read_json(&config_path)?;
    super::check_hidden(&config_path, &meta, m.hidden_size)?;
    let Some(cfg) = meta.get("config") else {
        return Err(invalid(&config_path, "lacks 'config'"));
    };
    let inv = match cfg.get("inv_adapter") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) if k == "nice" => Some(()),
        Some(other) => {
            return Err(unsupported(&config_path, format!("inv_adapter={other} is not supported (\"nice\" only)")));
        }
    };
    let mut plain = cfg.clone();
    if let Some(o) = plain.as_object_mut() {
        o.remove("inv_adapter");
        o.remove("inv_adapter_reduction_factor");
    }
    let mut meta = meta.clone();
    meta["config"] = plain;
    let mut inv_tensors = BTreeMap::new();
    let (name, cfg, slots) = super::bottleneck(&dir, &meta, m.num_layers, m.hidden_size, Some(&mut inv_tensors))?;
    if cfg.rule.parallel {
        return Err(unsupported(&config_path, "a parallel (par_bn) adapter under Stack is not supported"));
    }
    if let Some((l, loc)) = slots.keys().find(|k| !task_slots.contains_key(k)) {
        return Err(unsupported(
            &config_path,
            format!(
                "the lower adapter '{name}' has weights at layer {l} {} where the task adapter has none (its slots must be a subset of the task adapter's)",
                loc.as_str()
            ),
        ));
    }
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    let invertible = match inv {
        None if !inv_tensors.is_empty() => {
            return Err(invalid(&weights_path, "has invertible adapter weights but the config sets no inv_adapter"));
        }
        None => None,
        Some(()) => {
            let width = invertible_width(&weights_path, m, &inv_tensors)?;
            Some(invertible(&weights_path, inv_tensors, width, cfg.rule.activation)?)
        }
    };
    Ok(StackLower { name, rule: cfg.rule, slots, invertible })
}

/// The width the invertible adapter works at: the embeddings' output, which on ELECTRA is the
/// `embedded` states before `embeddings_project` (`embedding_size`). An ELECTRA backbone exported
/// before that output existed is named, with what to do, when the weights do not fit its hidden size.
fn invertible_width(path: &Path, m: &BackboneManifest, t: &BTreeMap<String, Tensor>) -> Result<usize, AdapterHubError> {
    if let Some(e) = m.embedding_size {
        return Ok(e);
    }
    let fits = t.get("F.0.weight").and_then(|w| w.shape.get(1)).is_none_or(|&i| i == m.hidden_size - m.hidden_size / 2);
    if m.architecture == Architecture::Electra && !fits {
        return Err(unsupported(
            path,
            format!(
                "the invertible adapter works at ELECTRA's embedding size (before embeddings_project), and backbone '{}' was exported \
                 without it (no embedding_size in backbone.json): re-export the backbone with tools/export_backbone.py",
                m.name
            ),
        ));
    }
    Ok(m.hidden_size)
}

fn invertible(path: &Path, mut t: BTreeMap<String, Tensor>, hidden: usize, activation: Activation) -> Result<Invertible, AdapterHubError> {
    let (h1, h2) = (hidden / 2, hidden - hidden / 2);
    let width = t.get("F.0.weight").map(|w| w.shape.first().copied().unwrap_or(0)).unwrap_or(0);
    let mut take = |key: &str, shape: &[usize]| -> Result<Vec<f32>, AdapterHubError> {
        let tensor = t.remove(key).ok_or_else(|| invalid(path, format!("invertible adapter weight '{key}' not found")))?;
        check_tensor(path, key, tensor, shape)
    };
    let mut linear = |n: &str, i: usize, o: usize| -> Result<[Linear; 2], AdapterHubError> {
        let w0 = take(&format!("{n}.0.weight"), &[width, i])?;
        let b0 = take(&format!("{n}.0.bias"), &[width])?;
        let w2 = take(&format!("{n}.2.weight"), &[o, width])?;
        let b2 = take(&format!("{n}.2.bias"), &[o])?;
        let shape = |r, c, v| Array2::from_shape_vec((r, c), v).map_err(|e| invalid(path, e.to_string()));
        Ok([Linear { w: shape(width, i, w0)?, b: Array1::from(b0) }, Linear { w: shape(o, width, w2)?, b: Array1::from(b2) }])
    };
    let f = linear("F", h2, h1)?;
    let g = linear("G", h1, h2)?;
    if let Some(extra) = t.keys().next() {
        return Err(unsupported(path, format!("unexpected invertible adapter weight '{extra}' (NICE has F.0, F.2, G.0, G.2)")));
    }
    Ok(Invertible { f, g, activation })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ELECTRA's `Stack(lang, stack)` from the library fixture: the invertible adapter (8 + 8 wide,
    /// embedding size 16) loads where the manifest has `embedding_size`, and an ELECTRA backbone
    /// exported without it is told to re-export.
    #[test]
    fn electra_invertible_adapter_needs_the_embedding_size() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adapterhub-breadth/electra/adapters");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(STACK_DIR)).unwrap();
        for f in std::fs::read_dir(fixture.join("stack")).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
        }
        for f in STACK_FILES {
            std::fs::copy(fixture.join("lang").join(f), dir.path().join(STACK_DIR).join(f)).unwrap();
        }
        let manifest = |embedding_size: Option<usize>| -> BackboneManifest {
            serde_json::from_value(serde_json::json!({
                "format_version": 1, "name": "electra", "architecture": "electra", "num_layers": 3, "hidden_size": 32,
                "embedding_size": embedding_size, "num_heads": 4, "intermediate_size": 64, "vocab_size": 100,
                "type_vocab_size": 2, "max_positions": 64, "pad_token_id": 0, "layer_norm_eps": 1e-12,
                "tokenizer": null, "slots": ["attention", "ffn"]
            }))
            .unwrap()
        };
        let w = super::super::load_for(dir.path(), &manifest(Some(16))).expect("loads with embedding_size");
        assert!(w.stack.and_then(|s| s.invertible).is_some());
        let e = super::super::load_for(dir.path(), &manifest(None)).expect_err("an old ELECTRA export").to_string();
        assert!(e.contains("embedding size") && e.contains("re-export the backbone"), "{e}");
    }

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [(0.0, 0.0), (0.5, 0.520_499_877_813_046_5), (1.0, 0.842_700_792_949_714_9), (3.0, 0.999_977_909_503_001_4)] {
            assert!((erf(x) - want).abs() < 1e-12, "erf({x})");
            assert!((erf(-x) + want).abs() < 1e-12, "erf(-{x})");
        }
    }
}
