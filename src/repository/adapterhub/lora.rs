//! LoRA and (IA)^3 adapters (`architecture: "lora"`; the library stores (IA)^3 as a LoRA config with
//! `composition_mode: "scale"`): config and weights, as the per-layer "methods" bank of `layer.onnx`
//! takes them (models/README.md, "Layer graphs"; `tools/adapterdrop_tools/graphs_methods.py`).
//!
//! The library wraps the projections `q`, `k`, `v` of self-attention (`attn_matrices`, when
//! `selfattn_lora`), the FFN's intermediate (`intermediate_lora`) and output (`output_lora`) dense
//! layers. LoRA: `y = x W + b + (x A^T B^T) * alpha / r`; (IA)^3: `y = (x W + b) * (B[:, 0] * alpha / r)`.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{Array1, Array2};
use serde_json::{Map, Value};

use super::safetensors::Tensor;
use super::{AdapterHubError, check_tensor, invalid, read_safetensors, unsupported};

/// A projection a LoRA / (IA)^3 adapter can change, in the order of the graph's inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Query,
    Key,
    Value,
    Intermediate,
    Output,
}

impl Target {
    pub const ALL: [Target; 5] = [Self::Query, Self::Key, Self::Value, Self::Intermediate, Self::Output];

    /// The name in `layer.onnx` input names (`methods.<name>.lora_a`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Query => "query",
            Self::Key => "key",
            Self::Value => "value",
            Self::Intermediate => "intermediate",
            Self::Output => "output",
        }
    }

    /// (in, out) features for a backbone of `hidden` x `ffn`.
    pub fn dims(self, hidden: usize, ffn: usize) -> (usize, usize) {
        match self {
            Self::Intermediate => (hidden, ffn),
            Self::Output => (ffn, hidden),
            _ => (hidden, hidden),
        }
    }
}

/// One projection's weights in the row-vector layout the graph multiplies: `lora_a [in, r]`,
/// `lora_b [r, out]` with the scaling folded in (LoRA), or `scale [out]` ((IA)^3).
#[derive(Debug, Clone, PartialEq)]
pub enum MethodWeights {
    Lora { lora_a: Array2<f32>, lora_b: Array2<f32> },
    Scale(Array1<f32>),
}

/// Every target a method changes in one layer.
pub type LayerMethods = BTreeMap<Target, MethodWeights>;

/// The parts of a LoRA / (IA)^3 config that decide shapes and math.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// `lora` or `ia3`.
    pub method: &'static str,
    pub r: usize,
    pub scaling: f32,
    pub targets: Vec<Target>,
    pub leave_out: Vec<usize>,
}

/// Largest rank accepted (the bank is as wide as the widest rank).
const MAX_RANK: usize = 4096;

fn number(cfg: &Map<String, Value>, key: &str, default: f64) -> Result<f64, String> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => n.as_f64().filter(|v| v.is_finite()).ok_or_else(|| format!("{key}={n} is not a finite number")),
        Some(other) => Err(format!("{key}={other} must be a number")),
    }
}

fn flag(cfg: &Map<String, Value>, key: &str, default: bool) -> Result<bool, String> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(format!("{key}={other} must be true or false")),
    }
}

/// Parses a config whose `architecture` is `"lora"`; every refusal names the key and its value.
pub fn parse(cfg: &Map<String, Value>) -> Result<LoraConfig, String> {
    let method = match cfg.get("composition_mode").and_then(Value::as_str).unwrap_or("add") {
        "add" => "lora",
        "scale" => "ia3",
        other => return Err(format!("composition_mode='{other}' is not supported (\"add\": LoRA, \"scale\": (IA)^3)")),
    };
    for key in ["use_gating", "use_dora"] {
        if flag(cfg, key, false)? {
            return Err(format!("{key}=true is not supported (set it to false)"));
        }
    }
    for key in ["vera_b", "vera_d"] {
        if !matches!(cfg.get(key), None | Some(Value::Null)) {
            return Err(format!("{key}={} (VeRA) is not supported (LoRA and (IA)^3 only)", cfg[key]));
        }
    }
    let r = number(cfg, "r", 8.0)?;
    if r < 1.0 || r.fract() != 0.0 || r > MAX_RANK as f64 {
        return Err(format!("r={r} must be a whole number from 1 to {MAX_RANK}"));
    }
    let alpha = number(cfg, "alpha", 8.0)?;
    let r = r as usize;
    if method == "ia3" && r != 1 {
        return Err(format!("r={r} with composition_mode='scale' ((IA)^3) is not supported (the library's (IA)^3 has r=1)"));
    }
    let mut targets = Vec::new();
    if flag(cfg, "selfattn_lora", true)? {
        let matrices = match cfg.get("attn_matrices") {
            None => vec![Value::from("q"), Value::from("v")],
            Some(Value::Array(a)) => a.clone(),
            Some(other) => return Err(format!("attn_matrices={other} must be a list of \"q\", \"k\", \"v\"")),
        };
        for m in &matrices {
            targets.push(match m.as_str() {
                Some("q") => Target::Query,
                Some("k") => Target::Key,
                Some("v") => Target::Value,
                _ => return Err(format!("attn_matrices entry {m} is not supported (one of \"q\", \"k\", \"v\")")),
            });
        }
    }
    if flag(cfg, "intermediate_lora", false)? {
        targets.push(Target::Intermediate);
    }
    if flag(cfg, "output_lora", false)? {
        targets.push(Target::Output);
    }
    targets.sort_unstable();
    targets.dedup();
    if targets.is_empty() {
        return Err(
            "the config changes no projection (attn_matrices empty or selfattn_lora false, intermediate_lora and output_lora false)".into(),
        );
    }
    let leave_out = super::config::leave_out(cfg)?;
    Ok(LoraConfig { method, r, scaling: (alpha / r as f64) as f32, targets, leave_out })
}

/// `<model>.(encoder|transformer).layer.<i>.<module>.loras.<name>.lora_(A|B)` -> (layer, target, A|B).
fn key_of(key: &str, name: &str) -> Option<(usize, Target, char)> {
    let rest = ["bert.", "roberta.", "distilbert.", "electra."].iter().find_map(|p| key.strip_prefix(p)).unwrap_or(key);
    let rest = rest.strip_prefix("encoder.layer.").or_else(|| rest.strip_prefix("transformer.layer."))?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok().filter(|_| layer.bytes().all(|b| b.is_ascii_digit()))?;
    let (module, rest) = rest.split_once(".loras.")?;
    let target = match module {
        "attention.self.query" | "attention.q_lin" => Target::Query,
        "attention.self.key" | "attention.k_lin" => Target::Key,
        "attention.self.value" | "attention.v_lin" => Target::Value,
        "intermediate.dense" | "ffn.lin1" => Target::Intermediate,
        "output.dense" | "ffn.lin2" => Target::Output,
        _ => return None,
    };
    let param = rest.strip_prefix(name)?.strip_prefix('.')?;
    let which = match param {
        "lora_A" => 'A',
        "lora_B" => 'B',
        _ => return None,
    };
    Some((layer, target, which))
}

/// Reads and checks the weights of every layer not left out: per layer, every target of the config.
pub fn load_weights(
    path: &Path,
    name: &str,
    cfg: &LoraConfig,
    num_layers: usize,
    hidden: usize,
    ffn: Option<usize>,
) -> Result<BTreeMap<usize, LayerMethods>, AdapterHubError> {
    let mut found: BTreeMap<(usize, Target, char), (String, Tensor)> = BTreeMap::new();
    for (key, tensor) in read_safetensors(path)? {
        let Some(k) = key_of(&key, name) else {
            return Err(unsupported(path, format!("unexpected weight '{key}' (not a {} weight of adapter '{name}')", cfg.method)));
        };
        found.insert(k, (key, tensor));
    }
    // Without the backbone's FFN size (tools reading a directory alone), the first FFN weight's.
    let ffn =
        ffn.or_else(|| found.iter().find(|((_, t, _), _)| *t == Target::Intermediate).and_then(|(_, (_, w))| w.shape.first().copied()));
    let ffn = ffn.unwrap_or(hidden);
    let mut out = BTreeMap::new();
    for layer in (0..num_layers).filter(|l| !cfg.leave_out.contains(l)) {
        let mut methods = LayerMethods::new();
        for &t in &cfg.targets {
            let (i, o) = t.dims(hidden, ffn);
            let mut take = |which: char, shape: &[usize]| -> Result<Vec<f32>, AdapterHubError> {
                let (key, tensor) = found.remove(&(layer, t, which)).ok_or_else(|| {
                    invalid(path, format!("no lora_{which} weight for layer {layer} {} (the config asks for it)", t.as_str()))
                })?;
                check_tensor(path, &key, tensor, shape)
            };
            let w = if cfg.method == "ia3" {
                let b = take('B', &[o, 1])?;
                MethodWeights::Scale(Array1::from_iter(b.into_iter().map(|v| v * cfg.scaling)))
            } else {
                let a = Array2::from_shape_vec((cfg.r, i), take('A', &[cfg.r, i])?).map_err(|e| invalid(path, e.to_string()))?;
                let b = Array2::from_shape_vec((o, cfg.r), take('B', &[o, cfg.r])?).map_err(|e| invalid(path, e.to_string()))?;
                MethodWeights::Lora { lora_a: a.t().to_owned(), lora_b: b.t().mapv(|v| v * cfg.scaling) }
            };
            methods.insert(t, w);
        }
        out.insert(layer, methods);
    }
    if let Some(((layer, t, _), (key, _))) = found.iter().next() {
        return Err(invalid(
            path,
            format!(
                "has weight '{key}' for layer {layer} {}, which the config does not use (leave_out / attn_matrices / intermediate_lora / output_lora / num_layers {num_layers})",
                t.as_str()
            ),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cfg(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn lora_and_ia3_configs_read() {
        // LoRAConfig's defaults: q and v, r 8, alpha 8.
        let c = parse(&cfg(json!({"architecture": "lora"}))).unwrap();
        assert_eq!((c.method, c.r, c.scaling, c.targets.clone()), ("lora", 8, 1.0, vec![Target::Query, Target::Value]));
        let c = parse(&cfg(json!({"architecture": "lora", "r": 4, "alpha": 8, "attn_matrices": ["k", "q"], "output_lora": true,
                                  "intermediate_lora": true, "leave_out": [2, 0]})))
        .unwrap();
        assert_eq!(c.scaling, 2.0);
        assert_eq!(c.targets, vec![Target::Query, Target::Key, Target::Intermediate, Target::Output]);
        assert_eq!(c.leave_out, vec![0, 2]);
        let ia3 = parse(&cfg(json!({"architecture": "lora", "composition_mode": "scale", "r": 1, "alpha": 1,
                                    "attn_matrices": ["k", "v"], "intermediate_lora": true})))
        .unwrap();
        assert_eq!((ia3.method, ia3.targets.len()), ("ia3", 3));
    }

    #[test]
    fn refusals_name_the_key() {
        let cases = [
            (json!({"composition_mode": "scale", "r": 2}), "r=2 with composition_mode='scale'"),
            (json!({"r": 0}), "r=0 must be a whole number"),
            (json!({"r": 2.5}), "r=2.5 must be a whole number"),
            (json!({"alpha": "x"}), "alpha=\"x\" must be a number"),
            (json!({"selfattn_lora": false}), "changes no projection"),
            (json!({"vera_d": 0.1}), "vera_d=0.1 (VeRA)"),
            (json!({"use_gating": true}), "use_gating=true"),
        ];
        for (v, want) in cases {
            let err = parse(&cfg(v.clone())).unwrap_err();
            assert!(err.contains(want), "{v}: {err}");
        }
    }

    #[test]
    fn weight_keys_of_every_architecture() {
        assert_eq!(key_of("bert.encoder.layer.3.attention.self.value.loras.t.lora_B", "t"), Some((3, Target::Value, 'B')));
        assert_eq!(key_of("distilbert.transformer.layer.0.ffn.lin2.loras.t.lora_A", "t"), Some((0, Target::Output, 'A')));
        assert_eq!(key_of("roberta.encoder.layer.1.intermediate.dense.loras.t.lora_A", "t"), Some((1, Target::Intermediate, 'A')));
        assert_eq!(key_of("bert.encoder.layer.1.attention.output.dense.loras.t.lora_A", "t"), None, "not a target");
        assert_eq!(key_of("bert.encoder.layer.1.attention.self.query.loras.other.lora_A", "t"), None, "another adapter");
        assert_eq!(key_of("bert.encoder.layer.x.attention.self.query.loras.t.lora_A", "t"), None);
    }
}
