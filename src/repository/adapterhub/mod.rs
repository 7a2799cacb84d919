//! Reads an AdapterHub bottleneck adapter directory exactly as `save_adapter` / `save_head` write it
//! (`adapter_config.json`, `adapter.safetensors`, `head_config.json`, `model_head.safetensors`),
//! validates it against a backbone and returns its weights as data ([`AdapterWeights`]), the same
//! numbers the Python exporter (`tools/adapterdrop_tools/adapterhub.py`) bakes into slot graphs.

mod config;
mod head;
pub mod lora;
pub mod safetensors;
pub mod stack;
pub mod types;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2};
use serde_json::Value;

pub use self::config::bottleneck_size;
use self::safetensors::Tensor;
pub use self::types::{Activation, AdapterWeights, BottleneckWeights, HeadLayer, HeadWeights, RULE_FLAGS, Residual, SlotRule};
use crate::error::LoadError;
use crate::repository::manifest::{BackboneManifest, Location};

/// The four files of an adapter directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter.safetensors";
pub const HEAD_CONFIG: &str = "head_config.json";
pub const HEAD_WEIGHTS: &str = "model_head.safetensors";
pub const FILES: [&str; 4] = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEAD_CONFIG, HEAD_WEIGHTS];

/// Largest file of an adapter directory read (a MiniLM Pfeiffer adapter is ~0.3 MB, a BERT-large
/// Houlsby one ~25 MB).
const MAX_FILE_BYTES: u64 = 512 << 20;

/// Why an adapter directory cannot be served; always names the file.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdapterHubError {
    /// Well-formed but asks for something the server does not implement.
    #[error("{file}: unsupported adapter: {problem}")]
    Unsupported { file: PathBuf, problem: String },
    /// Missing, unreadable, malformed or not matching the backbone.
    #[error("{file}: {problem}")]
    Invalid { file: PathBuf, problem: String },
}

impl From<AdapterHubError> for LoadError {
    fn from(e: AdapterHubError) -> Self {
        match &e {
            AdapterHubError::Unsupported { file, .. } | AdapterHubError::Invalid { file, .. } => {
                let problem = e.to_string();
                let prefix = format!("{}: ", file.display());
                LoadError::new(file, problem.strip_prefix(&prefix).unwrap_or(&problem).to_string())
            }
        }
    }
}

fn invalid(file: &Path, problem: impl Into<String>) -> AdapterHubError {
    AdapterHubError::Invalid { file: file.to_path_buf(), problem: problem.into() }
}

fn unsupported(file: &Path, problem: impl Into<String>) -> AdapterHubError {
    AdapterHubError::Unsupported { file: file.to_path_buf(), problem: problem.into() }
}

/// Reads, checks and returns adapter and head of `dir` for a backbone of `num_layers` x `hidden`.
pub fn load(dir: &Path, num_layers: usize, hidden: usize) -> Result<AdapterWeights, AdapterHubError> {
    load_sized(dir, num_layers, hidden, None)
}

/// [`load`] for a backbone whose FFN size is known (LoRA / (IA)^3 weights of the FFN are checked
/// against it).
pub fn load_for(dir: &Path, m: &BackboneManifest) -> Result<AdapterWeights, AdapterHubError> {
    load_sized(dir, m.num_layers, m.hidden_size, Some(m))
}

fn load_sized(dir: &Path, num_layers: usize, hidden: usize, m: Option<&BackboneManifest>) -> Result<AdapterWeights, AdapterHubError> {
    let ffn = m.map(|m| m.intermediate_size);
    if dir.join("adapter_fusion_config.json").is_file() {
        return Err(unsupported(dir, "an AdapterFusion directory; fusion tasks are served from exported bundles"));
    }
    let config_path = dir.join(ADAPTER_CONFIG);
    let meta = read_json(&config_path)?;
    let (Some(cfg), Some(name)) = (meta.get("config"), meta.get("name").and_then(Value::as_str)) else {
        return Err(invalid(&config_path, "lacks 'config' or 'name'"));
    };
    check_hidden(&config_path, &meta, hidden)?;
    if let Some(c) = cfg.as_object().filter(|c| c.get("architecture").and_then(Value::as_str) == Some("lora")) {
        let lc = lora::parse(c).map_err(|p| unsupported(&config_path, p))?;
        let methods = lora::load_weights(&dir.join(ADAPTER_WEIGHTS), name, &lc, num_layers, hidden, ffn)?;
        let head = head::load(dir, hidden)?;
        let rule = SlotRule {
            ln_before: true,
            ln_after: true,
            residual: Residual::H,
            activation: Activation::Relu,
            scaling: 0.0,
            parallel: false,
        };
        return Ok(AdapterWeights {
            name: name.to_string(),
            method: lc.method.to_string(),
            rule,
            slots: BTreeMap::new(),
            methods,
            leave_out: lc.leave_out,
            head,
            stack: None,
        });
    }
    let (name, cfg, slots) = bottleneck(dir, &meta, num_layers, hidden, None)?;
    let head = head::load(dir, hidden)?;
    let stack = match (dir.join(stack::STACK_DIR).is_dir(), m) {
        (false, _) => None,
        (true, Some(m)) => Some(stack::load_lower(dir, m, cfg.method, &cfg.rule, &slots)?),
        (true, None) => return Err(unsupported(dir, "a Stack (stack/ directory) is served on the adapter banks only")),
    };
    Ok(AdapterWeights {
        name,
        method: cfg.method.to_string(),
        rule: cfg.rule,
        slots,
        methods: BTreeMap::new(),
        leave_out: cfg.leave_out,
        head,
        stack,
    })
}

fn check_hidden(config_path: &Path, meta: &Value, hidden: usize) -> Result<(), AdapterHubError> {
    match meta.get("hidden_size").filter(|h| !h.is_null()) {
        Some(h) if h.as_u64() != Some(hidden as u64) => {
            Err(invalid(config_path, format!("adapter hidden_size {h} != backbone hidden size {hidden}")))
        }
        _ => Ok(()),
    }
}

/// The bottleneck adapter of `dir` (config `meta`): its name, config and slot weights. `inv`
/// receives the invertible adapter's tensors (keys after `invertible_adapters.<name>.`) where a
/// Stack's lower adapter may have them; elsewhere they are refused.
type Slots = BTreeMap<(usize, Location), BottleneckWeights>;
fn bottleneck(
    dir: &Path,
    meta: &Value,
    num_layers: usize,
    hidden: usize,
    inv: Option<&mut BTreeMap<String, Tensor>>,
) -> Result<(String, config::BottleneckConfig, Slots), AdapterHubError> {
    let config_path = dir.join(ADAPTER_CONFIG);
    let (Some(cfg), Some(name)) = (meta.get("config"), meta.get("name").and_then(Value::as_str)) else {
        return Err(invalid(&config_path, "lacks 'config' or 'name'"));
    };
    let cfg = config::parse(cfg).map_err(|p| unsupported(&config_path, p))?;
    if let Some(&l) = cfg.leave_out.iter().find(|&&l| l >= num_layers) {
        tracing::debug!(layer = l, num_layers, "leave_out names a layer the backbone does not have");
    }
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    let (mut found, prefix) = read_adapter_tensors(&weights_path, dir, name, inv)?;
    let mut slots = BTreeMap::new();
    for layer in (0..num_layers).filter(|l| !cfg.leave_out.contains(l)) {
        let width = bottleneck_size(hidden, &cfg.reduction_factor, layer).map_err(|p| unsupported(&config_path, p))?;
        for &loc in &cfg.locations {
            let mut take = |param: &'static str, shape: &[usize]| -> Result<Vec<f32>, AdapterHubError> {
                let t = found.remove(&(layer, loc, param)).ok_or_else(|| {
                    invalid(&weights_path, format!("key '{prefix}{}{}' not found", key_base(layer, loc, name), param_key(param)))
                })?;
                check_tensor(&weights_path, &format!("{prefix}{}{}", key_base(layer, loc, name), param_key(param)), t, shape)
            };
            let down_w = take("down_w", &[width, hidden])?;
            let down_b = take("down_b", &[width])?;
            let up_w = take("up_w", &[hidden, width])?;
            let up_b = take("up_b", &[hidden])?;
            let weights = BottleneckWeights {
                down_w: Array2::from_shape_vec((width, hidden), down_w).map_err(|e| invalid(&weights_path, e.to_string()))?,
                down_b: Array1::from(down_b),
                up_w: Array2::from_shape_vec((hidden, width), up_w).map_err(|e| invalid(&weights_path, e.to_string()))?,
                up_b: Array1::from(up_b),
            };
            slots.insert((layer, loc), weights);
        }
    }
    if let Some((layer, loc, _)) = found.keys().next() {
        return Err(invalid(
            &weights_path,
            format!(
                "has weights for layer {layer} {}, which the config does not use (leave_out / mh_adapter / output_adapter / num_layers {num_layers})",
                loc.as_str()
            ),
        ));
    }
    Ok((name.to_string(), cfg, slots))
}

fn key_base(layer: usize, loc: Location, name: &str) -> String {
    let module = match loc {
        Location::Attention => "attention.output",
        Location::Ffn => "output",
    };
    format!("encoder.layer.{layer}.{module}.adapters.{name}.")
}

fn param_key(param: &str) -> &'static str {
    match param {
        "down_w" => "adapter_down.0.weight",
        "down_b" => "adapter_down.0.bias",
        "up_w" => "adapter_up.weight",
        _ => "adapter_up.bias",
    }
}

/// Adapter tensors by (layer, location, parameter), every key checked against the naming scheme
/// `[<model>.](encoder|transformer).layer.<i>.<module>.adapters.<name>.<param>`; also
/// returns the model prefix the keys use (for messages).
type Found = BTreeMap<(usize, Location, &'static str), Tensor>;
fn read_adapter_tensors(
    path: &Path,
    dir: &Path,
    name: &str,
    mut inv: Option<&mut BTreeMap<String, Tensor>>,
) -> Result<(Found, &'static str), AdapterHubError> {
    if !path.is_file() && dir.join("pytorch_adapter.bin").is_file() {
        return Err(invalid(
            &dir.join("pytorch_adapter.bin"),
            "a PyTorch pickle; the server reads safetensors only: convert it (tools/export_task.py writes adapter.safetensors into every bundle)",
        ));
    }
    let mut out = BTreeMap::new();
    let mut prefix = "";
    for (key, tensor) in read_safetensors(path)? {
        let unexpected = || unsupported(path, format!("unexpected weight '{key}' (not a bottleneck adapter)"));
        let rest = match ["bert.", "roberta.", "distilbert.", "electra."].into_iter().find(|p| key.starts_with(p)) {
            Some(p) => {
                prefix = p;
                &key[p.len()..]
            }
            None => key.as_str(),
        };
        if let (Some(inv), Some(rest)) = (inv.as_deref_mut(), rest.strip_prefix("invertible_adapters.")) {
            let param = rest
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('.'))
                .ok_or_else(|| invalid(path, format!("invertible adapter weight '{key}' does not belong to adapter '{name}'")))?;
            inv.insert(param.to_string(), tensor);
            continue;
        }
        // BERT, RoBERTa, XLM-R, ELECTRA: encoder.layer.<i>.(attention.output|output);
        // DistilBERT: transformer.layer.<i>.(attention_adapters|output_adapters).
        let rest = rest.strip_prefix("encoder.layer.").or_else(|| rest.strip_prefix("transformer.layer.")).ok_or_else(unexpected)?;
        let (layer, rest) = rest.split_once('.').ok_or_else(unexpected)?;
        let layer: usize = layer.parse().ok().filter(|_| layer.bytes().all(|b| b.is_ascii_digit())).ok_or_else(unexpected)?;
        const MODULES: [(&str, Location); 4] = [
            ("attention.output.adapters.", Location::Attention),
            ("attention_adapters.adapters.", Location::Attention),
            ("output.adapters.", Location::Ffn),
            ("output_adapters.adapters.", Location::Ffn),
        ];
        let (loc, rest) = MODULES.iter().find_map(|(m, loc)| rest.strip_prefix(m).map(|r| (*loc, r))).ok_or_else(unexpected)?;
        let (adapter, param) = rest.split_once('.').ok_or_else(unexpected)?;
        if adapter != name {
            return Err(invalid(path, format!("weight '{key}' belongs to adapter '{adapter}', the config names '{name}'")));
        }
        let param = match param {
            "adapter_down.0.weight" => "down_w",
            "adapter_down.0.bias" => "down_b",
            "adapter_up.weight" => "up_w",
            "adapter_up.bias" => "up_b",
            _ => return Err(unsupported(path, format!("unexpected weight '{key}' (unsupported adapter parameter)"))),
        };
        out.insert((layer, loc, param), tensor);
    }
    Ok((out, prefix))
}

/// The tensor's values if it has exactly `shape` and only finite values.
fn check_tensor(file: &Path, key: &str, t: Tensor, shape: &[usize]) -> Result<Vec<f32>, AdapterHubError> {
    if t.shape != shape {
        return Err(invalid(file, format!("{key}: shape {:?} != expected {shape:?}", t.shape)));
    }
    if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
        return Err(invalid(file, format!("{key}: element {i} is {} (weights must be finite)", t.data[i])));
    }
    Ok(t.data)
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, AdapterHubError> {
    let meta = std::fs::metadata(path).map_err(|e| invalid(path, format!("cannot read: {e}")))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(invalid(path, format!("{} bytes exceeds the limit of {MAX_FILE_BYTES}", meta.len())));
    }
    std::fs::read(path).map_err(|e| invalid(path, format!("cannot read: {e}")))
}

fn read_json(path: &Path) -> Result<Value, AdapterHubError> {
    serde_json::from_slice(&read_bytes(path)?).map_err(|e| invalid(path, format!("invalid JSON: {e}")))
}

/// Largest read buffer a thread keeps between files ([`read_safetensors`]).
const KEPT_BUFFER_BYTES: usize = 16 << 20;

thread_local! {
    /// The file bytes of the last safetensors read on this thread, reused: start-up reads 20,000
    /// files of ~0.5 MB on each loader thread, and a fresh buffer per file cost page faults and an
    /// unmap each time (a sixth of start-up, measured with perf).
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>, AdapterHubError> {
    use std::io::Read;
    let cannot = |e: std::io::Error| invalid(path, format!("cannot read: {e}"));
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    let len = file.metadata().map_err(cannot)?.len();
    if len > MAX_FILE_BYTES {
        return Err(invalid(path, format!("{len} bytes exceeds the limit of {MAX_FILE_BYTES}")));
    }
    READ_BUFFER.with_borrow_mut(|buf| {
        buf.clear();
        // The size was checked above; `take` bounds a file that grows meanwhile.
        file.by_ref().take(MAX_FILE_BYTES + 1).read_to_end(buf).map_err(cannot)?;
        if buf.len() as u64 > MAX_FILE_BYTES {
            return Err(invalid(path, format!("more than the limit of {MAX_FILE_BYTES} bytes")));
        }
        let parsed = safetensors::parse(buf).map_err(|p| invalid(path, format!("not a valid safetensors file: {p}")));
        if buf.capacity() > KEPT_BUFFER_BYTES {
            *buf = Vec::new();
        }
        parsed
    })
}
