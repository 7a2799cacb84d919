//! Engine results -> KServe output tensors, always in `raw_output_contents` (what tritonclient
//! reads). Scores, labels, tags and answers come from the same results the native API sends
//! (`api::results`); token heads' tensors are built in `token_outputs`.

use super::token_outputs;
use crate::api::results;
use crate::engine::TaskRun;
use crate::error::ServeError;
use crate::kserve_proto::model_infer_response::InferOutputTensor;
use crate::proto::SequenceResult;
use crate::repository::manifest::HeadKind;
use crate::router::token_info::RequestText;

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
    /// Tagging: per token, padded to the request's longest sequence.
    TokenLabels,
    TokenScores,
    TokenOffsets,
    /// Tagging: words and entities as one JSON array per sequence.
    Words,
    Entities,
    /// Extractive QA: the best answer, and the n-best as JSON.
    Answer,
    AnswerStart,
    AnswerEnd,
    AnswerScore,
    Answers,
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
        HeadKind::Tagging => token_outputs::TAGGING,
        HeadKind::QuestionAnswering => token_outputs::QA,
    }
}

/// (KServe datatype, dims after the batch dimension) of an output of `head` (`width` values per position).
pub fn spec(kind: Kind, head: HeadKind, width: i64) -> (&'static str, Vec<i64>) {
    match kind {
        Kind::Logits if head.per_token() => ("FP32", vec![-1, width]),
        Kind::Logits | Kind::Probabilities | Kind::Embedding => ("FP32", vec![width]),
        Kind::Label => ("BYTES", vec![1]),
        Kind::Predicted => ("BOOL", vec![width]),
        Kind::Choice => ("INT64", vec![1]),
        other => token_outputs::spec(other),
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
    text: Option<&RequestText>,
    shaping: &results::Shaping,
) -> Result<(Vec<InferOutputTensor>, Vec<Vec<u8>>), ServeError> {
    let results: Vec<Vec<SequenceResult>> = tasks
        .iter()
        .zip(logits)
        .enumerate()
        .map(|(i, (run, rows))| results::task_sequences(run, i, rows, text, shaping))
        .collect::<Result<_, _>>()?;
    let mut outputs = Vec::with_capacity(plan.len());
    let mut raw = Vec::with_capacity(plan.len());
    for p in plan {
        let rows = &results[p.task];
        let n = rows.len() as i64;
        let head = &tasks[p.task].task.manifest.head;
        let (datatype, shape, bytes) = match p.kind {
            Kind::Logits if head.kind.per_token() => token_outputs::logits(rows, head.width()),
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
            other => token_outputs::tensor(other, rows),
        };
        outputs.push(InferOutputTensor { name: p.name.clone(), datatype: datatype.into(), shape, ..Default::default() });
        raw.push(bytes);
    }
    Ok((outputs, raw))
}
