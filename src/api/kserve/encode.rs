//! Engine results -> KServe output tensors, always in `raw_output_contents` (what tritonclient
//! reads). Scores and labels come from the same conversion the native API uses.

use crate::api::results::{Shaping, task_sequences};
use crate::engine::TaskRun;
use crate::error::ServeError;
use crate::kserve_proto::model_infer_response::InferOutputTensor;
use crate::proto::SequenceResult;
use crate::repository::manifest::HeadKind;

pub const LOGITS: &str = "logits";
pub const PROBABILITIES: &str = "probabilities";
pub const LABEL: &str = "label";
pub const PREDICTED: &str = "predicted";
pub const CHOICE: &str = "choice";
pub const EMBEDDING: &str = "embedding";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Logits,
    Probabilities,
    Label,
    /// Multi-label: BOOL `[batch, labels]`, whether each label scored above the threshold.
    Predicted,
    /// Multiple choice: INT64 `[batch, 1]`, the best choice's index.
    Choice,
    /// The built-in embedding task: FP32 `[batch, hidden]`.
    Embedding,
}

/// One output tensor to send: its name, the task it belongs to (index into the job's tasks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub name: String,
    pub task: usize,
    pub kind: Kind,
}

/// The outputs a head has: logits always; probabilities and label for classification heads.
pub fn kinds(head: HeadKind) -> &'static [(Kind, &'static str)] {
    match head {
        HeadKind::Classification => &[(Kind::Logits, LOGITS), (Kind::Probabilities, PROBABILITIES), (Kind::Label, LABEL)],
        HeadKind::Regression => &[(Kind::Logits, LOGITS)],
        HeadKind::MultiLabel => &[(Kind::Logits, LOGITS), (Kind::Probabilities, PROBABILITIES), (Kind::Predicted, PREDICTED)],
        HeadKind::MultipleChoice => {
            &[(Kind::Logits, LOGITS), (Kind::Probabilities, PROBABILITIES), (Kind::Choice, CHOICE), (Kind::Label, LABEL)]
        }
        HeadKind::Embedding => &[(Kind::Embedding, EMBEDDING)],
        // Refused at task load until their results are built (task.rs).
        HeadKind::Tagging | HeadKind::QuestionAnswering => &[(Kind::Logits, LOGITS)],
    }
}

/// Resolves the requested output names (empty = all) against the job's tasks, before running.
pub fn plan(tasks: &[TaskRun], prefixes: &[String], requested: &[String]) -> Result<Vec<Planned>, ServeError> {
    let all: Vec<Planned> = tasks
        .iter()
        .zip(prefixes)
        .enumerate()
        .flat_map(|(i, (run, prefix))| {
            kinds(run.task.manifest.head.kind).iter().map(move |(kind, n)| Planned { name: format!("{prefix}{n}"), task: i, kind: *kind })
        })
        .collect();
    if requested.is_empty() {
        return Ok(all);
    }
    requested
        .iter()
        .map(|name| {
            all.iter().find(|p| &p.name == name).cloned().ok_or_else(|| {
                let names: Vec<&str> = all.iter().map(|p| p.name.as_str()).collect();
                ServeError::InvalidArgument(format!("unknown output `{name}`; this request's outputs are {}", names.join(", ")))
            })
        })
        .collect()
}

/// Builds the output tensors and their raw contents from `logits[task][sequence]`.
pub fn encode(
    tasks: &[TaskRun],
    plan: &[Planned],
    logits: Vec<Vec<Vec<f32>>>,
    shaping: &Shaping,
) -> (Vec<InferOutputTensor>, Vec<Vec<u8>>) {
    let results: Vec<Vec<SequenceResult>> =
        tasks.iter().zip(logits).enumerate().map(|(i, (run, rows))| task_sequences(run, i, rows, shaping)).collect();
    let mut outputs = Vec::with_capacity(plan.len());
    let mut raw = Vec::with_capacity(plan.len());
    for p in plan {
        let rows = &results[p.task];
        let n = rows.len() as i64;
        let (datatype, shape, bytes) = match p.kind {
            Kind::Logits | Kind::Probabilities | Kind::Embedding => {
                let pick = |r: &SequenceResult| match p.kind {
                    Kind::Logits => r.logits.clone(),
                    Kind::Probabilities => r.scores.clone(),
                    _ => r.embedding.clone(),
                };
                let width = rows.first().map(|r| pick(r).len()).unwrap_or(0) as i64;
                let bytes: Vec<u8> = rows.iter().flat_map(pick).flat_map(f32::to_le_bytes).collect();
                ("FP32", vec![n, width], bytes)
            }
            Kind::Label => {
                let bytes = rows.iter().flat_map(|r| (r.label.len() as u32).to_le_bytes().into_iter().chain(r.label.bytes())).collect();
                ("BYTES", vec![n, 1], bytes)
            }
            Kind::Predicted => {
                let width = rows.first().map_or(0, |r| r.scores.len());
                let bytes = rows.iter().flat_map(|r| (0..width).map(|i| u8::from(r.label_indices.contains(&(i as i32))))).collect();
                ("BOOL", vec![n, width as i64], bytes)
            }
            Kind::Choice => ("INT64", vec![n, 1], rows.iter().flat_map(|r| i64::from(r.label_index).to_le_bytes()).collect()),
        };
        outputs.push(InferOutputTensor { name: p.name.clone(), datatype: datatype.into(), shape, ..Default::default() });
        raw.push(bytes);
    }
    (outputs, raw)
}
