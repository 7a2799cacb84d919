//! Weights-only registration (issue 12, item 4): a bare AdapterHub adapter directory, as
//! `save_adapter` writes it, plus serving metadata from the upload header, becomes a task version
//! directory: the four files under `adapterhub/` and a `task.json` the server writes itself (labels
//! from `head_config.json`, no graphs). The registrar then validates, trial-runs and persists it
//! exactly like an exported bundle.

use std::collections::BTreeSet;
use std::path::Path;

use crate::error::ServeError;
use crate::proto::{AdapterHubTask, DropConfig, drop_config::Mode};
use crate::repository::Registry;
use crate::repository::adapterhub::stack::{STACK_DIR, STACK_FILES};
use crate::repository::adapterhub::{self, FILES};
use crate::repository::manifest::{AdapterInfo, DropSpec, FORMAT_VERSION, HeadKind, HeadSpec, RobustRange, TaskManifest};

/// Most layers an explicit drop list may name (checked before it is converted).
const MAX_DROP_LAYERS: usize = 1024;
/// Longest composition string read (it is echoed in errors).
const MAX_COMPOSITION_BYTES: usize = 256;

/// The directory, inside the task version, that holds the AdapterHub files.
const DIR: &str = "adapterhub";

/// Rewrites the received files in `dir` into a weights-only task version directory.
pub fn prepare(dir: &Path, meta: &AdapterHubTask, registry: &Registry) -> Result<(), ServeError> {
    let invalid = ServeError::InvalidArgument;
    let got: BTreeSet<String> = std::fs::read_dir(dir)
        .map_err(io_error)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(io_error)?;
    let stacked = got.contains(STACK_DIR);
    if stacked {
        check_stack_files(&dir.join(STACK_DIR))?;
    }
    if let Some(extra) = got.iter().find(|f| !FILES.contains(&f.as_str()) && f.as_str() != STACK_DIR) {
        return Err(invalid(format!(
            "{extra}: not an AdapterHub adapter file; a weights-only upload holds exactly {FILES:?} (convert a pytorch_*.bin to safetensors)"
        )));
    }
    if let Some(missing) = FILES.iter().find(|f| !got.contains(**f)) {
        return Err(invalid(format!("{missing}: missing from the AdapterHub upload (send all of {FILES:?})")));
    }
    let backbone = registry.backbone(&meta.backbone).ok_or_else(|| {
        let known: Vec<String> = registry.backbones().iter().map(|b| b.name().to_string()).collect();
        ServeError::FailedPrecondition(format!(
            "header.adapterhub.backbone: backbone `{}` is not loaded on this server; loaded backbones: {known:?}",
            meta.backbone
        ))
    })?;
    let drop = drop_spec(meta.drop.as_ref())?;
    let lower = composition(&meta.composition, stacked)?;
    let weights = adapterhub::load_for(dir, &backbone.manifest).map_err(|e| {
        let message = e.to_string();
        let prefix = format!("{}/", dir.display());
        invalid(message.replace(&prefix, ""))
    })?;
    if let (Some((l, t)), Some(s)) = (&lower, &weights.stack)
        && (l != &s.name || t != &weights.name)
    {
        return Err(invalid(format!(
            "header.adapterhub.composition names Stack({l}, {t}) but the uploaded adapters are '{}' (stack/) and '{}'",
            s.name, weights.name
        )));
    }
    let max_answer_length = max_answer_length(meta, weights.head.kind, backbone.manifest.max_positions)?;
    let nested = dir.join(DIR);
    std::fs::create_dir(&nested).map_err(io_error)?;
    for f in FILES.iter().chain(stacked.then_some(&STACK_DIR)) {
        std::fs::rename(dir.join(f), nested.join(f)).map_err(io_error)?;
    }
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(nested.join(adapterhub::ADAPTER_CONFIG)).map_err(io_error)?)
        .map_err(|e| invalid(format!("adapter_config.json: {e}")))?;
    let manifest = TaskManifest {
        format_version: FORMAT_VERSION,
        name: "weights-only".into(), // the registrar writes the header's name and version
        version: 1,
        backbone: meta.backbone.clone(),
        description: if meta.description.is_empty() {
            format!("{}: {} adapter (weights-only registration)", weights.name, weights.method)
        } else {
            meta.description.clone()
        },
        adapter: AdapterInfo {
            method: weights.method.clone(),
            reduction_factor: config["config"].get("reduction_factor").cloned(),
            non_linearity: weights.methods.is_empty().then(|| weights.rule.activation.as_str().into()),
            source: Some(match &weights.stack {
                Some(s) => format!("AdapterHub Stack({}, {}) (weights-only registration)", s.name, weights.name),
                None => format!("AdapterHub adapter `{}` (weights-only registration)", weights.name),
            }),
        },
        slots: Vec::new(),
        drop,
        head: HeadSpec {
            kind: weights.head.kind,
            graph: None,
            labels: weights.head.labels.clone(),
            threshold: threshold(meta, &weights)?,
            max_answer_length,
        },
        adapterhub: Some(DIR.into()),
        composition: lower.map(|(l, t)| format!("Stack({l}, {t})")),
    };
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| ServeError::Internal(e.to_string()))?;
    std::fs::write(dir.join("task.json"), text + "\n").map_err(io_error)
}

/// The stack/ directory holds exactly the lower adapter's two files.
fn check_stack_files(stack: &Path) -> Result<(), ServeError> {
    let names: BTreeSet<String> = std::fs::read_dir(stack)
        .map_err(|_| ServeError::InvalidArgument(format!("{STACK_DIR}: must be a directory holding {STACK_FILES:?}")))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(io_error)?;
    let want: BTreeSet<String> = STACK_FILES.iter().map(|f| f.to_string()).collect();
    if names != want {
        return Err(ServeError::InvalidArgument(format!(
            "{STACK_DIR}/ holds {names:?}; a Stack's lower adapter is uploaded as exactly {STACK_FILES:?} under {STACK_DIR}/"
        )));
    }
    Ok(())
}

/// Checks `header.adapterhub.composition` against the upload: the (lower, task) names of a
/// `Stack`, or None for a single adapter. Only `Stack` of two plain adapters is served.
fn composition(text: &str, stacked: bool) -> Result<Option<(String, String)>, ServeError> {
    if text.len() > MAX_COMPOSITION_BYTES {
        return Err(ServeError::InvalidArgument(format!(
            "header.adapterhub.composition is {} bytes; at most {MAX_COMPOSITION_BYTES} (\"Stack(<lower>, <task>)\")",
            text.len()
        )));
    }
    let invalid = |m: String| ServeError::InvalidArgument(format!("header.adapterhub.composition `{text}`: {m}"));
    let text = text.trim();
    if text.is_empty() {
        if stacked {
            return Err(ServeError::InvalidArgument(format!(
                "the upload has a {STACK_DIR}/ adapter but header.adapterhub.composition is empty: set it to \"Stack(<lower>, <task>)\""
            )));
        }
        return Ok(None);
    }
    let (block, rest) = text.split_once('(').ok_or_else(|| invalid("expected Block(a, b, ...), e.g. Stack(lang, task)".into()))?;
    let block = block.trim();
    let args = rest.strip_suffix(')').ok_or_else(|| invalid("missing the closing ')'".into()))?;
    if !block.eq_ignore_ascii_case("stack") {
        return Err(invalid(format!(
            "{block} is not supported on the adapter banks; supported: Stack(<lower>, <task>) (one adapter under another, MAD-X)"
        )));
    }
    if let Some(inner) = args.split(',').find_map(|a| a.trim().split_once('(').map(|(b, _)| b.trim().to_string())) {
        return Err(invalid(format!("{inner} inside Stack is not supported; Stack takes two adapter names")));
    }
    let names: Vec<String> = args.split(',').map(|a| a.trim().to_string()).collect();
    if names.len() != 2 || names.iter().any(String::is_empty) {
        return Err(invalid(format!(
            "Stack of {} adapters is not supported; Stack takes two: the lower and the task adapter",
            names.len()
        )));
    }
    if !stacked {
        return Err(invalid(format!("a Stack needs its lower adapter's files {STACK_FILES:?} under {STACK_DIR}/ in the upload")));
    }
    Ok(Some((names[0].clone(), names[1].clone())))
}

/// The header's multi-label threshold: finite, within 0..=1, and only for a multi-label head.
fn threshold(meta: &AdapterHubTask, weights: &adapterhub::AdapterWeights) -> Result<Option<f32>, ServeError> {
    let Some(t) = meta.threshold else { return Ok(None) };
    if weights.head.kind != HeadKind::MultiLabel {
        return Err(ServeError::InvalidArgument(format!(
            "header.adapterhub.threshold: the adapter's head is {}, not multilabel; omit the threshold",
            weights.head.kind.as_str()
        )));
    }
    if !t.is_finite() || !(0.0..=1.0).contains(&t) {
        return Err(ServeError::InvalidArgument(format!("header.adapterhub.threshold = {t}: it must be a number within 0..=1")));
    }
    Ok(Some(t))
}

/// `header.adapterhub.max_answer_length`: for extractive QA heads, within the backbone's positions.
fn max_answer_length(meta: &AdapterHubTask, kind: HeadKind, max_positions: usize) -> Result<Option<u32>, ServeError> {
    let Some(m) = meta.max_answer_length else { return Ok(None) };
    if kind != HeadKind::QuestionAnswering {
        return Err(ServeError::InvalidArgument(format!(
            "header.adapterhub.max_answer_length is for question_answering heads; this head is {}",
            kind.as_str()
        )));
    }
    if m == 0 || m as usize > max_positions {
        return Err(ServeError::InvalidArgument(format!(
            "header.adapterhub.max_answer_length {m} must be 1..={max_positions} (the backbone's positions)"
        )));
    }
    Ok(Some(m))
}

fn drop_spec(drop: Option<&DropConfig>) -> Result<DropSpec, ServeError> {
    let mode = drop.and_then(|d| d.mode.as_ref()).ok_or_else(|| {
        ServeError::InvalidArgument("header.adapterhub.drop is required: drop_first, layers or robust {default, min, max}".into())
    })?;
    if let Mode::Layers(l) = mode
        && l.layers.len() > MAX_DROP_LAYERS
    {
        return Err(ServeError::InvalidArgument(format!(
            "header.adapterhub.drop.layers lists {} layers; at most {MAX_DROP_LAYERS}",
            l.layers.len()
        )));
    }
    Ok(match mode {
        Mode::DropFirst(n) => DropSpec::DropFirst(*n as usize),
        Mode::Layers(l) => DropSpec::Layers(l.layers.iter().map(|&i| i as usize).collect()),
        Mode::Robust(r) => DropSpec::Robust(RobustRange { default: r.default as usize, min: r.min as usize, max: r.max as usize }),
    })
}

fn io_error(e: std::io::Error) -> ServeError {
    ServeError::Internal(format!("repository I/O failed: {e}"))
}
