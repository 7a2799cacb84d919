//! Conversions between engine/repository types and the `adapterdrop.v1` messages.

use crate::proto::{self, DropConfig, ExplicitLayers, RobustRange, SequenceResult, TaskInfo, drop_config::Mode};
use crate::repository::manifest::{DropSpec, HeadKind};
use crate::repository::{TaskEntry, TaskState};

/// Logits to the response form: softmax scores and label for classification heads.
pub fn sequence_result(logits: Vec<f32>, kind: HeadKind, labels: &[String]) -> SequenceResult {
    if kind == HeadKind::Regression {
        return SequenceResult { logits, label_index: -1, ..Default::default() };
    }
    let scores = softmax(&logits);
    let best = scores.iter().enumerate().fold(0, |b, (i, s)| if *s > scores[b] { i } else { b });
    SequenceResult { label: labels.get(best).cloned().unwrap_or_default(), label_index: best as i32, logits, scores, ..Default::default() }
}

/// Numerically stable softmax, accumulated in f64.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) as f64;
    let exps: Vec<f64> = logits.iter().map(|v| (*v as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

pub fn task_info(entry: &TaskEntry, is_default: bool) -> TaskInfo {
    let (status, reason) = match &entry.state {
        TaskState::Loading => (proto::TaskStatus::Loading, String::new()),
        TaskState::Ready => (proto::TaskStatus::Ready, String::new()),
        TaskState::Failed(r) => (proto::TaskStatus::Failed, r.clone()),
        TaskState::Draining => (proto::TaskStatus::Draining, String::new()),
    };
    let mut info = TaskInfo {
        name: entry.name.clone(),
        version: entry.version,
        is_default_version: is_default,
        status: status as i32,
        status_reason: reason,
        ..Default::default()
    };
    if let Some(m) = &entry.manifest {
        info.backbone = m.backbone.clone();
        info.description = m.description.clone();
        info.adapter_method = m.adapter.method.clone();
        info.head_type = m.head.kind.as_str().into();
        info.labels = m.head.labels.clone();
        info.slots = m
            .slots
            .iter()
            .map(|s| match s.adapters.is_empty() {
                true => format!("{}:{}", s.layer, s.location.as_str()),
                false => format!(
                    "{}:{}:fusion[{}]",
                    s.layer,
                    s.location.as_str(),
                    s.adapters.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(",")
                ),
            })
            .collect();
        info.drop = Some(DropConfig {
            mode: Some(match &m.drop {
                DropSpec::DropFirst(n) => Mode::DropFirst(*n as u32),
                DropSpec::Layers(l) => Mode::Layers(ExplicitLayers { layers: l.iter().map(|v| *v as u32).collect() }),
                DropSpec::Robust(r) => Mode::Robust(RobustRange { default: r.default as u32, min: r.min as u32, max: r.max as u32 }),
            }),
        });
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_is_stable_and_normalised() {
        let s = softmax(&[1000.0, 1000.0]);
        assert!((s[0] - 0.5).abs() < 1e-6 && (s[1] - 0.5).abs() < 1e-6);
        let s = softmax(&[0.0, (2.0f32).ln()]);
        assert!((s[1] - 2.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn regression_heads_have_no_label() {
        let r = sequence_result(vec![0.25], HeadKind::Regression, &[]);
        assert!(r.scores.is_empty() && r.label.is_empty() && r.label_index == -1);
        let c = sequence_result(vec![0.1, 0.9], HeadKind::Classification, &["no".into(), "yes".into()]);
        assert_eq!((c.label.as_str(), c.label_index), ("yes", 1));
    }
}
