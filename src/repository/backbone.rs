//! A loaded backbone: embeddings, per-layer segments and plain slots, tokenizer.

use std::path::Path;

use ort::value::TensorElementType as T;
use tokenizers::Tokenizer;

use super::adapterhub::lora::Target;
use super::manifest::{BackboneManifest, FORMAT_VERSION, Location, read_json, valid_name};
use crate::engine::banks::BackboneBanks;
use crate::error::LoadError;
use crate::runtime::{Dim, Graph, IoSpec, Runtime};

/// The graphs of one layer: two backbone segments and the two plain slots that close them.
#[derive(Debug)]
pub struct LayerGraphs {
    /// `(hidden, attention_mask) -> h`: attention up to its output projection.
    pub attention: Graph,
    /// Plain attention slot `(h, x) -> LN1(h + x)`.
    pub attention_slot: Graph,
    /// `hidden -> h`: FFN up to its output projection.
    pub ffn: Graph,
    /// Plain FFN slot `(h, x) -> LN2(h + x)`.
    pub ffn_slot: Graph,
}

impl LayerGraphs {
    pub fn plain_slot(&self, location: Location) -> &Graph {
        match location {
            Location::Attention => &self.attention_slot,
            Location::Ffn => &self.ffn_slot,
        }
    }
}

#[derive(Debug)]
pub struct Backbone {
    pub manifest: BackboneManifest,
    pub tokenizer: Option<Tokenizer>,
    pub embeddings: Graph,
    /// `embeddings_project.onnx` (`embedded [B,T,E] -> hidden [B,T,H]`) of a backbone whose manifest
    /// has `embedding_size` (ELECTRA): run after a Stack's invertible adapter on `embedded`.
    pub embeddings_project: Option<Graph>,
    pub layers: Vec<LayerGraphs>,
    /// `layers/<i>/layer.onnx` for every layer (whole layers with adapter banks as inputs) and the
    /// banks they read; `None` for a backbone exported before layer graphs existed.
    pub banked: Option<Banked>,
}

/// One graph per layer and the adapter banks of every bank task of this backbone.
#[derive(Debug)]
pub struct Banked {
    pub layers: Vec<Graph>,
    pub banks: BackboneBanks,
    /// The IoBinding runner of the layers (`runtime.io_binding`); `None`: plain session runs.
    pub bound: Option<crate::runtime::bound::BoundLayers>,
}

/// Contract of `layer.onnx` (models/README.md, "Layer graphs"): packed tokens `[tokens, H]`.
pub fn layer_contract(hidden: usize, ffn: usize) -> (Vec<IoSpec>, Vec<IoSpec>) {
    let h = hidden as i64;
    let th = [Dim::Any, Dim::Fixed(h)];
    let (one, two) = ([Dim::Any], [Dim::Any, Dim::Any]);
    let mut inputs = vec![
        IoSpec::new("hidden", T::Float32, &th),
        IoSpec::new("attention_gather", T::Int64, &two),
        IoSpec::new("attention_mask", T::Int64, &two),
        IoSpec::new("attention_scatter", T::Int64, &one),
    ];
    for names in GROUP_INPUTS {
        inputs.extend([
            IoSpec::new(names[0], T::Int64, &two),
            IoSpec::new(names[1], T::Int64, &one),
            IoSpec::new(names[2], T::Int64, &one),
        ]);
    }
    for names in BANK_INPUTS {
        let k = crate::repository::adapterhub::RULE_FLAGS as i64;
        let dims: [&[Dim]; 5] = [
            &[Dim::Any, Dim::Fixed(h), Dim::Any],
            &[Dim::Any, Dim::Fixed(1), Dim::Any],
            &[Dim::Any, Dim::Any, Dim::Fixed(h)],
            &[Dim::Any, Dim::Fixed(1), Dim::Fixed(h)],
            &[Dim::Any, Dim::Fixed(1), Dim::Fixed(k)],
        ];
        inputs.extend(names.iter().zip(dims).map(|(n, d)| IoSpec::new(n, T::Float32, d)));
    }
    for names in METHOD_GROUP_INPUTS {
        inputs.extend([
            IoSpec::new(names[0], T::Int64, &two),
            IoSpec::new(names[1], T::Int64, &one),
            IoSpec::new(names[2], T::Int64, &one),
        ]);
    }
    for (names, target) in METHOD_INPUTS.iter().zip(Target::ALL) {
        let (i, o) = target.dims(hidden, ffn);
        let (i, o) = (Dim::Fixed(i as i64), Dim::Fixed(o as i64));
        let dims: [&[Dim]; 3] = [&[Dim::Any, i, Dim::Any], &[Dim::Any, Dim::Any, o], &[Dim::Any, Dim::Fixed(1), o]];
        inputs.extend(names.iter().zip(dims).map(|(n, d)| IoSpec::new(n, T::Float32, d)));
    }
    (inputs, vec![IoSpec::new("y", T::Float32, &th)])
}

/// Group map input names of `layer.onnx`, per location (attention, ffn): `[group, index, ungroup]`.
pub const GROUP_INPUTS: [[&str; 3]; 2] =
    [["attention_group", "attention_index", "attention_ungroup"], ["ffn_group", "ffn_index", "ffn_ungroup"]];

/// The LoRA / (IA)^3 group maps: the entering tokens (attention projections) and the tokens after
/// the attention slot (FFN projections) grouped by methods-bank row.
pub const METHOD_GROUP_INPUTS: [[&str; 3]; 2] =
    [["methods_group", "methods_index", "methods_ungroup"], ["methods_ffn_group", "methods_ffn_index", "methods_ffn_ungroup"]];

/// LoRA / (IA)^3 bank input names of `layer.onnx`, per `Target` (in `Target::ALL` order):
/// `lora_a`, `lora_b`, `scale` (`engine/banks_methods.rs`).
pub const METHOD_INPUTS: [[&str; 3]; 5] = [
    ["methods.query.lora_a", "methods.query.lora_b", "methods.query.scale"],
    ["methods.key.lora_a", "methods.key.lora_b", "methods.key.scale"],
    ["methods.value.lora_a", "methods.value.lora_b", "methods.value.scale"],
    ["methods.intermediate.lora_a", "methods.intermediate.lora_b", "methods.intermediate.scale"],
    ["methods.output.lora_a", "methods.output.lora_b", "methods.output.scale"],
];

/// Bank input names of `layer.onnx`, per location (attention, ffn), in `Bank` field order, then
/// the stack banks (the lower adapters of `Stack` tasks) of the same locations.
pub const BANK_INPUTS: [[&str; 5]; 4] = [
    ["attention.down_w", "attention.down_b", "attention.up_w", "attention.up_b", "attention.rule"],
    ["ffn.down_w", "ffn.down_b", "ffn.up_w", "ffn.up_b", "ffn.rule"],
    ["attention.stack.down_w", "attention.stack.down_b", "attention.stack.up_w", "attention.stack.up_b", "attention.stack.rule"],
    ["ffn.stack.down_w", "ffn.stack.down_b", "ffn.stack.up_w", "ffn.stack.up_b", "ffn.stack.rule"],
];

/// Contract of a slot graph, plain or adapter: `(h, x) -> y`, all `[B, T, H]`.
pub fn slot_contract(hidden: usize) -> (Vec<IoSpec>, Vec<IoSpec>) {
    let bth = [Dim::Any, Dim::Any, Dim::Fixed(hidden as i64)];
    (vec![IoSpec::new("h", T::Float32, &bth), IoSpec::new("x", T::Float32, &bth)], vec![IoSpec::new("y", T::Float32, &bth)])
}

impl Backbone {
    pub fn load(runtime: &Runtime, dir: &Path) -> Result<Self, LoadError> {
        let manifest_path = dir.join("backbone.json");
        let manifest: BackboneManifest = read_json(&manifest_path)?;
        let bad = |problem: String| LoadError::new(&manifest_path, problem);
        if manifest.format_version != FORMAT_VERSION {
            return Err(bad(format!("format_version {} is not supported (expected {FORMAT_VERSION})", manifest.format_version)));
        }
        let dir_name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !valid_name(&manifest.name) || manifest.name != dir_name {
            return Err(bad(format!("name `{}` must be a valid name equal to the directory name `{dir_name}`", manifest.name)));
        }
        if manifest.num_layers == 0 || manifest.hidden_size == 0 || manifest.max_positions == 0 || manifest.vocab_size == 0 {
            return Err(bad("num_layers, hidden_size, max_positions and vocab_size must be positive".into()));
        }
        if manifest.type_vocab_size == 0 {
            return Err(bad("type_vocab_size must be at least 1".into()));
        }
        let tokenizer = match &manifest.tokenizer {
            None => None,
            Some(file) => Some(load_tokenizer(&dir.join(file))?),
        };

        let h = manifest.hidden_size as i64;
        let bt = [Dim::Any, Dim::Any];
        let bth = [Dim::Any, Dim::Any, Dim::Fixed(h)];
        let hidden_out = || vec![IoSpec::new("hidden", T::Float32, &bth)];
        let ids_in = [IoSpec::new("input_ids", T::Int64, &bt), IoSpec::new("token_type_ids", T::Int64, &bt)];
        let (embeddings, embeddings_project) = match manifest.embedding_size {
            None => (Graph::load(runtime, &dir.join("embeddings.onnx"), &ids_in, &hidden_out())?, None),
            Some(0) => return Err(bad("embedding_size must be positive".into())),
            Some(e) => {
                let embedded = IoSpec::new("embedded", T::Float32, &[Dim::Any, Dim::Any, Dim::Fixed(e as i64)]);
                let mut both = hidden_out();
                both.push(embedded.clone());
                let embeddings = Graph::load(runtime, &dir.join("embeddings.onnx"), &ids_in, &both)?;
                (embeddings, Some(Graph::load(runtime, &dir.join("embeddings_project.onnx"), &[embedded], &hidden_out())?))
            }
        };
        let (slot_in, slot_out) = slot_contract(manifest.hidden_size);
        let h_out = vec![IoSpec::new("h", T::Float32, &bth)];
        let mut layers = Vec::with_capacity(manifest.num_layers);
        for i in 0..manifest.num_layers {
            let ldir = dir.join("layers").join(i.to_string());
            layers.push(LayerGraphs {
                attention: Graph::load(
                    runtime,
                    &ldir.join("attention.onnx"),
                    &[IoSpec::new("hidden", T::Float32, &bth), IoSpec::new("attention_mask", T::Int64, &bt)],
                    &h_out,
                )?,
                attention_slot: Graph::load(runtime, &ldir.join("attention_slot.onnx"), &slot_in, &slot_out)?,
                ffn: Graph::load(runtime, &ldir.join("ffn.onnx"), &hidden_out(), &h_out)?,
                ffn_slot: Graph::load(runtime, &ldir.join("ffn_slot.onnx"), &slot_in, &slot_out)?,
            });
        }
        let banked = load_banked(runtime, dir, &manifest)?;
        Ok(Self { manifest, tokenizer, embeddings, embeddings_project, layers, banked })
    }

    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    pub fn num_layers(&self) -> usize {
        self.manifest.num_layers
    }
}

/// The layer graphs when the backbone has them all (a backbone without any serves through its
/// segments only; one with some but not all is broken).
fn load_banked(runtime: &Runtime, dir: &Path, manifest: &BackboneManifest) -> Result<Option<Banked>, LoadError> {
    let layer_dir = |i: usize| dir.join("layers").join(i.to_string());
    let present = (0..manifest.num_layers).filter(|&i| layer_dir(i).join("layer.onnx").is_file()).count();
    if present == 0 {
        return Ok(None);
    }
    let file = if runtime.capturable_layers() { capturable_layer_file(dir, manifest)? } else { "layer.onnx" };
    let path = |i: usize| layer_dir(i).join(file);
    let (inputs, outputs) = layer_contract(manifest.hidden_size, manifest.intermediate_size);
    // Layer graphs written before packed tokens (issue 15) take padded rows and row maps; those
    // before the methods bank (issue 14) lack its inputs.
    let regenerate = |e: LoadError| LoadError {
        file: e.file,
        problem: format!(
            "{}. Layer graphs exported before packed tokens (inputs `attention_rows`, `ffn_rows`) or the methods bank (`methods_*`) are no longer \
                 served: re-export the backbone with tools/export_backbone.py (the repository builders under tools/ \
                 write the new graphs: `make test-repo`, `make breadth-repo`), or delete its layers/<i>/layer.onnx to \
                 serve it on the per-task path",
            e.problem
        ),
    };
    let layers = (0..manifest.num_layers)
        .map(|i| Graph::load_layer(runtime, &path(i), &inputs, &outputs).map_err(regenerate))
        .collect::<Result<Vec<_>, _>>()?;
    let banks = BackboneBanks::new(manifest.num_layers, manifest.hidden_size, manifest.intermediate_size);
    // Fixed-address staging under cuda_graphs; on CUDA only where every layer graph was captured.
    let capture = runtime.cuda_graphs() && (runtime.device() == crate::runtime::Device::Cpu || layers.iter().all(Graph::captured));
    let bound = runtime
        .io_binding()
        .then(|| crate::runtime::bound::BoundLayers::new(runtime.device(), manifest.hidden_size, capture, runtime.cuda_stream().is_some()));
    Ok(Some(Banked { layers, banks, bound }))
}

/// Start-up check under `runtime.layer_graph = "capturable"` (or `runtime.cuda_graphs`): every
/// backbone of `repo` with layer graphs has the capturable ones, else start-up stops naming the
/// export flag (a backbone the loader refuses for another reason is left to it, as before).
pub fn check_capturable_layers(repo: &Path) -> Result<(), LoadError> {
    let Ok(entries) = std::fs::read_dir(repo.join("backbones")) else { return Ok(()) };
    let mut dirs: Vec<_> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    for dir in dirs.iter().filter(|d| !d.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))) {
        let Ok(manifest) = read_json::<BackboneManifest>(&dir.join("backbone.json")) else { continue };
        if dir.join("layers").join("0").join("layer.onnx").is_file() {
            capturable_layer_file(dir, &manifest)?;
        }
    }
    Ok(())
}

/// `runtime.layer_graph = "capturable"` (or `runtime.cuda_graphs`) needs the layer graphs without
/// control flow: a backbone exported without them stops start-up, naming the export flag.
fn capturable_layer_file<'m>(dir: &Path, manifest: &'m BackboneManifest) -> Result<&'m str, LoadError> {
    let problem = match manifest.capturable_layer.as_deref() {
        None => "has no `capturable_layer`".to_string(),
        Some(f) if !valid_name(f) => format!("`capturable_layer` {f:?} must be a plain file name"),
        Some(f) => match (0..manifest.num_layers).find(|&i| !dir.join("layers").join(i.to_string()).join(f).is_file()) {
            Some(i) => format!("`capturable_layer` names {f}, which layers/{i} lacks"),
            None => return Ok(f),
        },
    };
    Err(LoadError::new(
        dir.join("backbone.json"),
        format!(
            "{problem}: runtime.cuda_graphs and runtime.layer_graph = \"capturable\" need the layer graphs without control flow; \
             re-export the backbone with `tools/export_backbone.py --capturable-layers` (make_bench_repo.py --capturable-layers), \
             or set runtime.layer_graph = \"dispatch\" and runtime.cuda_graphs = false"
        ),
    ))
}

/// Loads `tokenizer.json` with its built-in padding and truncation switched off: the server pads
/// per batch and decides about truncation per request.
fn load_tokenizer(path: &Path) -> Result<Tokenizer, LoadError> {
    if !path.is_file() {
        return Err(LoadError::new(path, "tokenizer file is missing"));
    }
    let mut tokenizer = Tokenizer::from_file(path).map_err(|e| LoadError::new(path, format!("invalid tokenizer: {e}")))?;
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).map_err(|e| LoadError::new(path, format!("cannot disable truncation: {e}")))?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capturable_layer_file_must_be_a_plain_name_present_in_every_layer() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..2 {
            std::fs::create_dir_all(dir.path().join(format!("layers/{i}"))).unwrap();
            std::fs::write(dir.path().join(format!("layers/{i}/layer_capturable.onnx")), b"x").unwrap();
        }
        std::fs::write(dir.path().join("layers/0/only0.onnx"), b"x").unwrap();
        let manifest = |file: Option<&str>| -> BackboneManifest {
            let mut m = serde_json::json!({"format_version": 1, "name": "b", "architecture": "bert", "num_layers": 2,
                "hidden_size": 4, "num_heads": 1, "intermediate_size": 8, "vocab_size": 10, "type_vocab_size": 2,
                "max_positions": 8, "pad_token_id": 0, "layer_norm_eps": 1e-12, "tokenizer": null,
                "slots": ["attention", "ffn"]});
            if let Some(f) = file {
                m["capturable_layer"] = f.into();
            }
            serde_json::from_value(m).unwrap()
        };
        assert_eq!(capturable_layer_file(dir.path(), &manifest(Some("layer_capturable.onnx"))).unwrap(), "layer_capturable.onnx");
        for (file, problem) in [
            (None, "has no `capturable_layer`"),
            (Some("../layers/0/layer_capturable.onnx"), "must be a plain file name"),
            (Some("only0.onnx"), "which layers/1 lacks"),
        ] {
            let e = capturable_layer_file(dir.path(), &manifest(file)).unwrap_err().to_string();
            assert!(e.contains(problem) && e.contains("--capturable-layers"), "{e}");
        }
    }
}
