//! The built-in embedding task of every backbone (issue 14): the sentence embedding of the plain
//! backbone, pooled as the model's sentence-transformers configuration says. It is a [`Task`] like
//! any other (no adapters: every layer dropped, so on the bank path every bank index is 0), named
//! `<backbone>/embedding` (a `/` no registered task name can hold), so a request can ask for it
//! beside adapter tasks and share the trunk with them.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::backbone::Backbone;
use super::manifest::{AdapterInfo, DropSpec, FORMAT_VERSION, HeadKind, HeadSpec, TaskManifest};
use super::registry::{TaskEntry, TaskState};
use super::task::Task;

/// Suffix of the built-in task's name: `<backbone>/embedding`.
pub const SUFFIX: &str = "/embedding";
/// The only version a built-in task has.
pub const VERSION: u32 = 1;

/// sentence-transformers' pooling modes the server computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean of the last hidden states over the attended tokens (`pooling_mode_mean_tokens`).
    #[default]
    Mean,
    /// The first token's last hidden state (`pooling_mode_cls_token`).
    Cls,
}

/// `backbone.json` key `embedding`: how the built-in embedding task pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSpec {
    #[serde(default)]
    pub pooling: Pooling,
    /// L2-normalise the pooled vector (sentence-transformers' `Normalize` module).
    #[serde(default)]
    pub normalize: bool,
}

/// The built-in task's name for `backbone`.
pub fn task_name(backbone: &str) -> String {
    format!("{backbone}{SUFFIX}")
}

/// The built-in embedding task of `backbone`.
pub fn task(backbone: Arc<Backbone>) -> Task {
    let spec = backbone.manifest.embedding;
    let manifest = TaskManifest {
        format_version: FORMAT_VERSION,
        name: task_name(backbone.name()),
        version: VERSION,
        backbone: backbone.name().to_string(),
        description: format!(
            "sentence embedding of the plain backbone (built in): {} pooling, {}",
            match spec.pooling {
                Pooling::Mean => "mean",
                Pooling::Cls => "CLS",
            },
            if spec.normalize { "L2-normalised" } else { "not normalised" }
        ),
        adapter: AdapterInfo { method: "none".into(), ..Default::default() },
        slots: Vec::new(),
        drop: DropSpec::DropFirst(backbone.num_layers()),
        head: HeadSpec { kind: HeadKind::Embedding, graph: None, labels: Vec::new(), threshold: None, max_answer_length: None },
        adapterhub: None,
        composition: None,
    };
    Task {
        manifest,
        backbone,
        slots: BTreeMap::new(),
        fusion: BTreeMap::new(),
        up: BTreeMap::new(),
        head: None,
        adapterhub: None,
        bank: None,
    }
}

/// The registry entries of every backbone's built-in task, by name.
pub fn entries(backbones: &BTreeMap<String, Arc<Backbone>>) -> BTreeMap<String, TaskEntry> {
    backbones
        .values()
        .map(|b| {
            let task = Arc::new(task(b.clone()));
            let entry = TaskEntry {
                name: task.name().to_string(),
                version: VERSION,
                state: TaskState::Ready,
                manifest: Some(task.manifest.clone()),
                task: Some(task),
            };
            (entry.name.clone(), entry)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_with_defaults_and_refuses_unknown_modes() {
        let s: EmbeddingSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(s, EmbeddingSpec { pooling: Pooling::Mean, normalize: false });
        let s: EmbeddingSpec = serde_json::from_str(r#"{"pooling": "cls", "normalize": true}"#).unwrap();
        assert_eq!(s, EmbeddingSpec { pooling: Pooling::Cls, normalize: true });
        let e = serde_json::from_str::<EmbeddingSpec>(r#"{"pooling": "max"}"#).unwrap_err().to_string();
        assert!(e.contains("unknown variant `max`"), "{e}");
    }

    #[test]
    fn names_cannot_collide_with_registered_tasks() {
        assert_eq!(task_name("minilm"), "minilm/embedding");
        assert!(!super::super::manifest::valid_name(&task_name("minilm")));
    }
}
