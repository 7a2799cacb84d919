//! Sequence heads beyond classification: multi-label (a sigmoid per label, the labels above the
//! threshold) and multiple choice (one result per item: a softmax over its choices' logits).

use super::super::convert::softmax;
use crate::proto::SequenceResult;
use crate::repository::manifest::HeadSpec;

/// What a request adds to its head outputs: thresholds per task, and the choice texts per item
/// when its inputs are multiple-choice items.
#[derive(Debug, Default, Clone)]
pub struct Shaping {
    /// The request's threshold for each task (index as the job's tasks); None: the task's own.
    pub thresholds: Vec<Option<f32>>,
    /// Each multiple-choice item's choices (the item's results name the best one).
    pub choices: Option<Vec<Vec<String>>>,
}

impl Shaping {
    pub fn from_request(req: &crate::proto::InferRequest) -> Self {
        let choices = match &req.inputs {
            Some(crate::proto::infer_request::Inputs::Choices(c)) => Some(c.items.iter().map(|i| i.choices.clone()).collect()),
            _ => None,
        };
        Self { thresholds: req.tasks.iter().map(|t| t.threshold).collect(), choices }
    }
}

/// Sigmoid per label; the labels scoring above `threshold`, in label order.
pub fn multilabel(logits: Vec<f32>, head: &HeadSpec, threshold: f32) -> SequenceResult {
    let scores: Vec<f32> = logits.iter().map(|&x| (1.0 / (1.0 + (-f64::from(x)).exp())) as f32).collect();
    let above: Vec<usize> = scores.iter().enumerate().filter(|(_, s)| **s > threshold).map(|(i, _)| i).collect();
    SequenceResult {
        labels: above.iter().map(|&i| head.labels.get(i).cloned().unwrap_or_default()).collect(),
        label_indices: above.iter().map(|&i| i as i32).collect(),
        threshold,
        label_index: -1,
        logits,
        scores,
        ..Default::default()
    }
}

/// One result per item from its choices' one-logit rows: logits, softmax scores, the best choice.
pub fn choices(rows: Vec<Vec<f32>>, items: &[Vec<String>]) -> Vec<SequenceResult> {
    let mut rows = rows.into_iter();
    items
        .iter()
        .map(|texts| {
            let logits: Vec<f32> = (&mut rows).take(texts.len()).map(|r| r.first().copied().unwrap_or(f32::NAN)).collect();
            let scores = softmax(&logits);
            let best = scores.iter().enumerate().fold(0, |b, (i, s)| if *s > scores[b] { i } else { b });
            SequenceResult {
                label: texts.get(best).cloned().unwrap_or_default(),
                label_index: best as i32,
                logits,
                scores,
                ..Default::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::manifest::HeadKind;

    fn head(kind: HeadKind, labels: &[&str]) -> HeadSpec {
        HeadSpec { kind, graph: None, labels: labels.iter().map(|s| s.to_string()).collect(), threshold: None, max_answer_length: None }
    }

    #[test]
    fn multilabel_keeps_the_labels_strictly_above_the_threshold() {
        let h = head(HeadKind::MultiLabel, &["a", "b", "c"]);
        let r = multilabel(vec![0.0, 2.0, -3.0], &h, 0.5);
        assert_eq!(r.scores[0], 0.5);
        assert!((r.scores[1] - 0.880_797_1).abs() < 1e-6);
        assert_eq!((r.labels, r.label_indices, r.label_index), (vec!["b".to_string()], vec![1], -1));
        let r = multilabel(vec![0.0, 2.0, -3.0], &h, 0.0);
        assert_eq!(r.label_indices, vec![0, 1, 2]);
    }

    #[test]
    fn choices_are_grouped_per_item_and_softmaxed() {
        let items = vec![vec!["x".to_string(), "y".to_string()], vec!["p".to_string(), "q".to_string(), "r".to_string()]];
        let out = choices(vec![vec![0.0], vec![1.0], vec![3.0], vec![0.0], vec![0.0]], &items);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].label.as_str(), out[0].label_index, out[0].logits.clone()), ("y", 1, vec![0.0, 1.0]));
        assert_eq!((out[1].label.as_str(), out[1].label_index), ("p", 0));
        assert!((out[1].scores.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
