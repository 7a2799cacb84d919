//! The JSON manifests of repository format v1 (see `models/README.md`).

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use super::fusion::{FusedAdapterSpec, SlotKind};
use crate::error::LoadError;

pub const FORMAT_VERSION: u32 = 1;
/// Largest manifest (`task.json`, `backbone.json`) read: parsing holds several times its size.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneManifest {
    pub format_version: u32,
    pub name: String,
    pub architecture: Architecture,
    pub num_layers: usize,
    pub hidden_size: usize,
    /// ELECTRA with `embedding_size` != `hidden_size`: the width of `embeddings.onnx`'s second output
    /// `embedded` (before `embeddings_project`, where a Stack's invertible adapter runs) and of the
    /// input of `embeddings_project.onnx`. Absent: the embeddings end at `hidden`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_size: Option<usize>,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub type_vocab_size: usize,
    pub max_positions: usize,
    pub pad_token_id: i64,
    pub layer_norm_eps: f64,
    pub tokenizer: Option<String>,
    pub slots: Vec<Location>,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub license: String,
    /// How the built-in `<backbone>/embedding` task pools (sentence-transformers' `1_Pooling` and
    /// `Normalize` modules, carried over by the exporter); absent: mean pooling, not normalised.
    #[serde(default)]
    pub embedding: super::embedding::EmbeddingSpec,
    /// File name, in every `layers/<i>`, of the layer graph without control flow that CUDA graphs
    /// can capture (`export_backbone.py --capturable-layers`; `runtime.layer_graph = "capturable"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capturable_layer: Option<String>,
}

/// The encoder family a backbone was exported from. The graphs already hold every difference
/// (position ids, token types, ELECTRA's embedding projection); the server reads this to name the
/// architecture, and refuses any other value when the manifest is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Bert,
    Roberta,
    #[serde(rename = "xlm-roberta")]
    XlmRoberta,
    /// No token-type embeddings: `token_type_ids` are accepted and ignored by its embeddings graph.
    Distilbert,
    Electra,
}

impl Architecture {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bert => "bert",
            Self::Roberta => "roberta",
            Self::XlmRoberta => "xlm-roberta",
            Self::Distilbert => "distilbert",
            Self::Electra => "electra",
        }
    }
}

/// Where in a layer an adapter slot sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Location {
    /// After the attention output projection (Houlsby's `mh_adapter`).
    Attention,
    /// After the FFN output projection (Pfeiffer and Houlsby).
    Ffn,
}

impl Location {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Attention => "attention",
            Self::Ffn => "ffn",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskManifest {
    pub format_version: u32,
    pub name: String,
    pub version: u32,
    pub backbone: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub adapter: AdapterInfo,
    pub slots: Vec<SlotSpec>,
    pub drop: DropSpec,
    pub head: HeadSpec,
    /// Optional: a directory (relative to the task's) holding the AdapterHub files the task was
    /// exported from (`super::adapterhub::FILES`), which the server loads into its adapter banks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapterhub: Option<String>,
    /// `Stack(<lower>, <task>)` (MAD-X) when the AdapterHub directory holds a lower adapter under
    /// `stack/` (`adapterhub/stack.rs`); absent for one adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub composition: Option<String>,
}

impl TaskManifest {
    /// A task registered from AdapterHub files alone: no graphs, served from its weights.
    pub fn weights_only(&self) -> bool {
        self.head.graph.is_none()
    }

    /// Every file of the task version directory the manifest names (relative paths).
    pub fn files(&self) -> std::collections::BTreeSet<String> {
        let mut out: std::collections::BTreeSet<String> = std::iter::once("task.json".to_string())
            .chain(
                self.slots
                    .iter()
                    .flat_map(|s| std::iter::once(s.graph.clone()).chain(s.adapters.iter().map(|a| a.graph.clone())).chain(s.up.clone())),
            )
            .chain(self.head.graph.clone())
            .collect();
        if let Some(dir) = &self.adapterhub {
            let dir = dir.trim_end_matches('/');
            out.extend(super::adapterhub::FILES.iter().map(|f| format!("{dir}/{f}")));
            if self.composition.is_some() {
                let stack = super::adapterhub::stack::STACK_DIR;
                out.extend(super::adapterhub::stack::STACK_FILES.iter().map(|f| format!("{dir}/{stack}/{f}")));
            }
        }
        out
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AdapterInfo {
    #[serde(default)]
    pub method: String,
    #[serde(default)]
    pub reduction_factor: Option<serde_json::Value>,
    #[serde(default)]
    pub non_linearity: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotSpec {
    pub layer: usize,
    pub location: Location,
    pub graph: String,
    /// `adapter` (default; absent in older manifests) or `fusion` (see `super::fusion`).
    #[serde(default, skip_serializing_if = "SlotKind::is_adapter")]
    pub kind: SlotKind,
    /// Fusion slots only: the fused adapters' output graphs, in fusion order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<FusedAdapterSpec>,
    /// Adapter slots only, optional: the same adapter's output graph `(h, x) -> up`, so that a fusion
    /// holding the same file computes the adapter once for both (`super::fusion`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up: Option<String>,
}

/// Which layers lose their adapters; exactly one form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DropSpec {
    /// Specialized AdapterDrop: layers `0..n-1`.
    DropFirst(usize),
    /// Exactly these layers.
    Layers(Vec<usize>),
    /// Robust AdapterDrop: any `drop_first` in `min..=max`, `default` when the request names none.
    Robust(RobustRange),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RobustRange {
    pub default: usize,
    pub min: usize,
    pub max: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadSpec {
    #[serde(rename = "type")]
    pub kind: HeadKind,
    /// Absent only in a weights-only task (registered from AdapterHub files, `adapterhub` set): its
    /// head runs on the host from the AdapterHub weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph: Option<String>,
    #[serde(default)]
    pub labels: Vec<String>,
    /// Multi-label heads only: the score above which a label is predicted (default 0.5); a
    /// request may override it (`TaskRef.threshold`, KServe parameter `threshold`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    /// Extractive QA only: the longest answer in tokens when a request names none (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_answer_length: Option<u32>,
}

/// What a head computes. Sequence heads read the first token; token heads (`per_token`) every one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    Classification,
    Regression,
    /// Token classification: one label per token (`add_tagging_head`).
    Tagging,
    /// Extractive QA: start and end logits per token (`add_qa_head`).
    QuestionAnswering,
    /// Sigmoid per label; the labels scoring above the threshold are predicted.
    #[serde(rename = "multilabel")]
    MultiLabel,
    /// One logit per (context, choice) pair; a softmax over each input's choices.
    MultipleChoice,
    /// The built-in sentence embedding of a backbone (no head weights: pooling only).
    Embedding,
}

impl HeadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classification => "classification",
            Self::Regression => "regression",
            Self::Tagging => "tagging",
            Self::QuestionAnswering => "question_answering",
            Self::MultiLabel => "multilabel",
            Self::MultipleChoice => "multiple_choice",
            Self::Embedding => "embedding",
        }
    }

    /// The head runs on every token, not only the first.
    pub fn per_token(self) -> bool {
        matches!(self, Self::Tagging | Self::QuestionAnswering)
    }
}

impl HeadSpec {
    /// Outputs per position: one per label, 1 for regression and multiple choice (one logit per
    /// choice pair), 2 (start, end) for QA; 0 for the embedding head, whose width is the
    /// backbone's hidden size.
    pub fn width(&self) -> usize {
        match self.kind {
            HeadKind::Classification | HeadKind::Tagging | HeadKind::MultiLabel => self.labels.len(),
            HeadKind::Regression | HeadKind::MultipleChoice => 1,
            HeadKind::QuestionAnswering => 2,
            HeadKind::Embedding => 0,
        }
    }

    /// The label names responses carry (none for regression, QA, multiple choice and embeddings).
    pub fn label_names(&self) -> &[String] {
        match self.kind {
            HeadKind::Classification | HeadKind::Tagging | HeadKind::MultiLabel => &self.labels,
            HeadKind::Regression | HeadKind::QuestionAnswering | HeadKind::MultipleChoice | HeadKind::Embedding => &[],
        }
    }
}

/// The threshold a multi-label head uses when neither its task nor the request sets one.
pub const DEFAULT_THRESHOLD: f32 = 0.5;

/// Reads and parses a manifest, naming the file in every error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let size = std::fs::metadata(path).map_err(|e| LoadError::new(path, format!("cannot read: {e}")))?.len();
    if size > MAX_MANIFEST_BYTES {
        return Err(LoadError::new(path, format!("{size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::new(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| LoadError::new(path, format!("invalid manifest: {e}")))
}

/// Names of backbones and tasks: safe as a single path component.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    first_ok && name.len() <= 64 && !name.contains("..") && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_spec_forms_parse() {
        let d: DropSpec = serde_json::from_str(r#"{"drop_first": 3}"#).unwrap();
        assert_eq!(d, DropSpec::DropFirst(3));
        let d: DropSpec = serde_json::from_str(r#"{"layers": [0, 2]}"#).unwrap();
        assert_eq!(d, DropSpec::Layers(vec![0, 2]));
        let d: DropSpec = serde_json::from_str(r#"{"robust": {"default": 1, "min": 0, "max": 4}}"#).unwrap();
        assert_eq!(d, DropSpec::Robust(RobustRange { default: 1, min: 0, max: 4 }));
        assert!(serde_json::from_str::<DropSpec>(r#"{"drop_first": 1, "layers": [1]}"#).is_err());
    }

    #[test]
    fn names_are_single_safe_components() {
        for ok in ["sent", "sent-v2", "a.b_c", "X9"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "../etc", "a/b", ".hidden", "a..b", "a b", &"x".repeat(65), "é"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn architectures_parse_and_unknown_ones_are_named() {
        for (text, arch) in [
            ("bert", Architecture::Bert),
            ("roberta", Architecture::Roberta),
            ("xlm-roberta", Architecture::XlmRoberta),
            ("distilbert", Architecture::Distilbert),
            ("electra", Architecture::Electra),
        ] {
            let parsed: Architecture = serde_json::from_str(&format!("\"{text}\"")).unwrap();
            assert_eq!(parsed, arch);
            assert_eq!(parsed.as_str(), text);
        }
        let e = serde_json::from_str::<Architecture>("\"gpt2\"").unwrap_err().to_string();
        assert!(e.contains("unknown variant `gpt2`") && e.contains("`distilbert`"), "{e}");
    }
}
