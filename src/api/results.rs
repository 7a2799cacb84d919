//! Engine rows -> `SequenceResult`s, by head kind: sequence heads (logits, softmax, label;
//! multi-label and multiple choice in `sequence`), embeddings, tagging (per token, per word,
//! entities) and extractive QA (answer spans over windows). The native API and the KServe endpoint
//! both build their answers from these.

pub mod qa;
pub mod sequence;
pub mod tagging;

use super::convert;
use crate::engine::TaskRun;
use crate::error::ServeError;
use crate::proto::SequenceResult;
use crate::repository::manifest::{DEFAULT_THRESHOLD, HeadKind};
use crate::router::token_info::RequestText;
pub use sequence::Shaping;

/// Answers a QA task gives when neither the request nor the task names a maximum (SQuAD recipes).
pub const DEFAULT_MAX_ANSWER_TOKENS: usize = 30;

/// One result per input of the request: `rows` are the engine rows of task `index` of the job (one
/// per sequence).
pub fn task_sequences(
    run: &TaskRun,
    index: usize,
    rows: Vec<Vec<f32>>,
    text: Option<&RequestText>,
    shaping: &Shaping,
) -> Result<Vec<SequenceResult>, ServeError> {
    let head = &run.task.manifest.head;
    let missing = || ServeError::Internal(format!("task `{}`: a {} head got no token origins", run.task.name(), head.kind.as_str()));
    match head.kind {
        HeadKind::Tagging => {
            let text = text.ok_or_else(missing)?;
            rows.into_iter()
                .enumerate()
                .map(|(i, logits)| tagging::result(logits, &head.labels, &text.tokens[i], &text.inputs[text.input_of[i]].0))
                .collect()
        }
        HeadKind::QuestionAnswering => {
            let text = text.ok_or_else(missing)?;
            let max_len =
                text.answers.max_answer_length.or(head.max_answer_length.map(|m| m as usize)).unwrap_or(DEFAULT_MAX_ANSWER_TOKENS);
            (0..text.inputs.len())
                .map(|i| {
                    let windows: Vec<_> = text.sequences_of(i).map(|s| (rows[s].as_slice(), &text.tokens[s])).collect();
                    let context = text.inputs[i].1.as_deref().ok_or_else(missing)?;
                    qa::result(&windows, context, max_len, text.answers.n_best)
                })
                .collect()
        }
        HeadKind::Classification | HeadKind::Regression => {
            Ok(rows.into_iter().map(|l| convert::sequence_result(l, head.kind, &head.labels)).collect())
        }
        HeadKind::Embedding => {
            Ok(rows.into_iter().map(|embedding| SequenceResult { embedding, label_index: -1, ..Default::default() }).collect())
        }
        HeadKind::MultiLabel => {
            let t = shaping.thresholds.get(index).copied().flatten().or(head.threshold).unwrap_or(DEFAULT_THRESHOLD);
            Ok(rows.into_iter().map(|l| sequence::multilabel(l, head, t)).collect())
        }
        HeadKind::MultipleChoice => Ok(match &shaping.choices {
            Some(items) => sequence::choices(rows, items),
            // The router refuses a multiple-choice task without choice inputs.
            None => rows.into_iter().map(|logits| SequenceResult { logits, label_index: -1, ..Default::default() }).collect(),
        }),
    }
}

/// `text`'s characters `[start, end)` (code points), clamped to the text.
fn slice(chars: &[char], start: u32, end: u32) -> String {
    let end = (end as usize).min(chars.len());
    chars[(start as usize).min(end)..end].iter().collect()
}
