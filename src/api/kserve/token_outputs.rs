//! KServe tensors of token heads. Per-token outputs are `[batch, tokens, ...]`, padded to the
//! request's longest sequence (label "", score 0, offsets -1); words, entities and the n-best
//! answers are one JSON array per sequence (`[batch, 1]` BYTES), the rest one value per sequence.

use serde_json::json;

use super::encode::Kind;
use crate::proto::SequenceResult;

pub const TAGGING: &[(Kind, &str)] = &[
    (Kind::Logits, "logits"),
    (Kind::TokenLabels, "token_labels"),
    (Kind::TokenScores, "token_scores"),
    (Kind::TokenOffsets, "token_offsets"),
    (Kind::Words, "words"),
    (Kind::Entities, "entities"),
];

pub const QA: &[(Kind, &str)] = &[
    (Kind::Answer, "answer"),
    (Kind::AnswerStart, "answer_start"),
    (Kind::AnswerEnd, "answer_end"),
    (Kind::AnswerScore, "answer_score"),
    (Kind::Answers, "answers"),
];

/// (datatype, dims after the batch dimension) of a token head's output.
pub fn spec(kind: Kind) -> (&'static str, Vec<i64>) {
    match kind {
        Kind::TokenLabels => ("BYTES", vec![-1]),
        Kind::TokenScores => ("FP32", vec![-1]),
        Kind::TokenOffsets => ("INT64", vec![-1, 2]),
        Kind::AnswerStart | Kind::AnswerEnd => ("INT64", vec![1]),
        Kind::AnswerScore => ("FP32", vec![1]),
        _ => ("BYTES", vec![1]),
    }
}

type Tensor = (&'static str, Vec<i64>, Vec<u8>);

fn bytes_item(s: &str) -> impl Iterator<Item = u8> + '_ {
    (s.len() as u32).to_le_bytes().into_iter().chain(s.bytes())
}

/// Tagging logits `[batch, tokens, width]`, zero-padded.
pub fn logits(rows: &[SequenceResult], width: usize) -> Tensor {
    let longest = rows.iter().map(|r| r.tokens.len()).max().unwrap_or(0);
    let mut bytes = Vec::with_capacity(rows.len() * longest * width * 4);
    for r in rows {
        bytes.extend(r.logits.iter().flat_map(|v| v.to_le_bytes()));
        bytes.resize(bytes.len() + (longest - r.tokens.len()) * width * 4, 0);
    }
    ("FP32", vec![rows.len() as i64, longest as i64, width as i64], bytes)
}

pub fn tensor(kind: Kind, rows: &[SequenceResult]) -> Tensor {
    let n = rows.len() as i64;
    let longest = rows.iter().map(|r| r.tokens.len()).max().unwrap_or(0);
    let pad = |r: &SequenceResult| longest - r.tokens.len();
    let best = |r: &SequenceResult| r.answers.first().cloned().unwrap_or_default();
    let json_rows = |f: &dyn Fn(&SequenceResult) -> serde_json::Value| -> Tensor {
        let bytes = rows.iter().flat_map(|r| bytes_item(&f(r).to_string()).collect::<Vec<_>>()).collect();
        ("BYTES", vec![n, 1], bytes)
    };
    match kind {
        Kind::TokenLabels => {
            let bytes = rows
                .iter()
                .flat_map(|r| {
                    r.tokens.iter().flat_map(|t| bytes_item(&t.label).collect::<Vec<_>>()).chain((0..pad(r)).flat_map(|_| bytes_item("")))
                })
                .collect();
            ("BYTES", vec![n, longest as i64], bytes)
        }
        Kind::TokenScores => {
            let bytes = rows
                .iter()
                .flat_map(|r| r.tokens.iter().map(|t| t.score).chain((0..pad(r)).map(|_| 0.0)).flat_map(f32::to_le_bytes))
                .collect();
            ("FP32", vec![n, longest as i64], bytes)
        }
        Kind::TokenOffsets => {
            let bytes = rows
                .iter()
                .flat_map(|r| {
                    let real = r.tokens.iter().flat_map(|t| if t.special { [-1, -1] } else { [t.start as i64, t.end as i64] });
                    real.chain((0..2 * pad(r)).map(|_| -1)).flat_map(i64::to_le_bytes)
                })
                .collect();
            ("INT64", vec![n, longest as i64, 2], bytes)
        }
        Kind::Words => json_rows(&|r| {
            json!(
                r.words
                    .iter()
                    .map(|w| json!({"text": w.text, "label": w.label, "score": w.score, "start": w.start, "end": w.end}))
                    .collect::<Vec<_>>()
            )
        }),
        Kind::Entities => json_rows(&|r| {
            json!(
                r.entities
                    .iter()
                    .map(|e| json!({"type": e.r#type, "text": e.text, "score": e.score, "start": e.start, "end": e.end}))
                    .collect::<Vec<_>>()
            )
        }),
        Kind::Answers => json_rows(&|r| {
            json!(r.answers.iter().map(|a| json!({"text": a.text, "score": a.score, "start": a.start, "end": a.end})).collect::<Vec<_>>())
        }),
        Kind::Answer => ("BYTES", vec![n, 1], rows.iter().flat_map(|r| bytes_item(&best(r).text).collect::<Vec<_>>()).collect()),
        Kind::AnswerStart => ("INT64", vec![n, 1], rows.iter().flat_map(|r| (best(r).start as i64).to_le_bytes()).collect()),
        Kind::AnswerEnd => ("INT64", vec![n, 1], rows.iter().flat_map(|r| (best(r).end as i64).to_le_bytes()).collect()),
        Kind::AnswerScore => ("FP32", vec![n, 1], rows.iter().flat_map(|r| best(r).score.to_le_bytes()).collect()),
        Kind::Logits | Kind::Probabilities | Kind::Label | Kind::Predicted | Kind::Choice | Kind::Embedding => {
            unreachable!("sequence outputs are built in encode.rs")
        }
    }
}
