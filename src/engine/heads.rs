//! Heads as data on the host (issue 12, decision 3). A sequence head reads only the first token of
//! the last layer (`[rows, H]`), a token head (tagging, QA) every real token; either runs here, from
//! the task's AdapterHub weights, as a few small matmuls per task: no ONNX Runtime session per task.
//! Agrees with the task's `head.onnx` within 1e-6 of the logits' scale (tests/host_heads.rs).
//!
//! The contract with the runners (`banked.rs`, `executor.rs`): a head gets, for every row it serves,
//! that row's final states over its real tokens (`[len, H]`, padding already cut off, whatever the
//! runner's layout), and returns one flat vector per row, row-major `[positions, width]`: one
//! position for sequence heads, one per token for token heads.

use ndarray::{Array2, ArrayView2, ArrayView3, Axis, Zip, s, stack};

use super::tensors::run_head;
use crate::error::EngineError;
use crate::repository::Task;
use crate::repository::adapterhub::HeadWeights;
use crate::repository::manifest::HeadKind;

/// One lane's output: per row (in the lane's row order) a flat row-major `[positions, width]` vector.
pub type LaneOutput = Vec<Vec<f32>>;

/// A sequence head's lane output as a `[rows, width]` matrix (for tests and benchmarks).
pub fn to_matrix(out: &[Vec<f32>]) -> Array2<f32> {
    let width = out.first().map_or(0, Vec::len);
    Array2::from_shape_vec((out.len(), width), out.concat()).expect("every row of a sequence head has the same width")
}

/// Which head a task with both a head graph and AdapterHub head weights runs: the bank path
/// computes heads on the host, the segment path keeps the exported graph (so each path's results
/// stay bit for bit what they were).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadSource {
    HostFirst,
    GraphFirst,
}

/// Runs `task`'s head over `rows` (each a row's real-token states `[len, H]`, with its attention
/// mask in `masks`); one vector per row.
pub fn run_task_head(
    task: &Task,
    rows: &[ArrayView2<'_, f32>],
    masks: &[&[i64]],
    source: HeadSource,
) -> Result<Vec<Vec<f32>>, EngineError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    if task.manifest.head.kind == HeadKind::Embedding {
        return Ok(super::pooling::pool(task.backbone.manifest.embedding, rows, masks));
    }
    if task.manifest.head.kind.per_token() {
        // Token heads run from AdapterHub weights only (the task loader refuses a head graph for them).
        let w = task.adapterhub.as_ref().ok_or_else(|| EngineError::Contract(format!("token head of `{}` has no weights", task.name())))?;
        return Ok(rows.iter().map(|r| head_logits(&w.head, r.view()).into_raw_vec_and_offset().0).collect());
    }
    let first: Vec<_> = rows.iter().map(|r| r.row(0)).collect();
    let first = stack(Axis(0), &first).map_err(|e| EngineError::Contract(format!("stacking first tokens: {e}")))?;
    let logits = match (&task.adapterhub, &task.head) {
        (_, Some(graph)) if source == HeadSource::GraphFirst || task.adapterhub.is_none() => run_head(graph, &first.insert_axis(Axis(1)))?,
        (Some(w), _) => head_logits(&w.head, first.view()),
        (None, _) => {
            return Err(EngineError::Contract(format!("task `{}` has neither a head graph nor head weights", task.name())));
        }
    };
    Ok(logits.outer_iter().map(|r| r.to_vec()).collect())
}

/// The head's linear layers on each row of `x` (`[N, H]`: first tokens, or one row's tokens):
/// `[N, width]`, the activation between layers. f32 throughout, like ONNX Runtime's Gemm; the two
/// differ only in summation order (measured: at most 4.3e-7 of max(1, largest |logit|), tests/host_heads.rs).
pub fn head_logits(head: &HeadWeights, x: ArrayView2<'_, f32>) -> Array2<f32> {
    let mut z = x.to_owned();
    for (i, layer) in head.layers.iter().enumerate() {
        z = z.dot(&layer.w.t());
        let act = head.activation.filter(|_| i + 1 < head.layers.len());
        Zip::from(z.rows_mut()).for_each(|mut row| {
            Zip::from(&mut row).and(&layer.b).for_each(|v, b| {
                *v += b;
                if let Some(a) = act {
                    *v = a.apply(*v);
                }
            });
        });
    }
    z
}

/// The head on the first token of the given rows of `hidden` (`[R, T, H]`), in `rows` order.
pub fn head_logits_on_rows(head: &HeadWeights, hidden: ArrayView3<'_, f32>, rows: &[usize]) -> Array2<f32> {
    let first = hidden.slice(s![.., 0, ..]);
    head_logits(head, first.select(Axis(0), rows).view())
}

#[cfg(test)]
mod tests {
    use ndarray::{Array1, array};

    use super::*;
    use crate::repository::adapterhub::{Activation, HeadLayer};

    fn layer(w: Array2<f32>, b: Vec<f32>) -> HeadLayer {
        HeadLayer { w, b: Array1::from(b) }
    }

    #[test]
    fn computes_the_two_layer_head() {
        let head = HeadWeights {
            kind: HeadKind::Classification,
            labels: vec!["a".into(), "b".into()],
            layers: vec![layer(array![[1.0, 0.0], [0.5, -1.0]], vec![0.0, 0.25]), layer(array![[2.0, 0.0], [0.0, -1.0]], vec![0.5, 1.0])],
            activation: Some(Activation::Tanh),
        };
        let first = array![[0.2f32, 0.4], [-1.0, 3.0]];
        let got = head_logits(&head, first.view());
        for (r, x) in first.rows().into_iter().enumerate() {
            let z0 = (x[0]).tanh();
            let z1 = (0.5 * x[0] - x[1] + 0.25).tanh();
            let want = [2.0 * z0 + 0.5, -z1 + 1.0];
            for c in 0..2 {
                assert!((got[[r, c]] - want[c]).abs() < 1e-6, "{r},{c}: {} vs {}", got[[r, c]], want[c]);
            }
        }
    }

    #[test]
    fn one_layer_head_has_no_activation_and_three_layers_use_it_twice() {
        let one = HeadWeights {
            kind: HeadKind::Tagging,
            labels: vec!["O".into(), "B".into()],
            layers: vec![layer(array![[1.0, 2.0], [0.0, -1.0]], vec![0.5, 0.0])],
            activation: Some(Activation::Tanh),
        };
        let tokens = array![[3.0f32, 1.0], [-2.0, 0.5], [0.0, 0.0]];
        assert_eq!(head_logits(&one, tokens.view()), array![[5.5f32, -1.0], [-0.5, -0.5], [0.5, 0.0]]);
        let relu3 = HeadWeights {
            kind: HeadKind::Regression,
            labels: vec![],
            layers: vec![
                layer(array![[1.0, 0.0], [0.0, 1.0]], vec![0.0, -1.0]),
                layer(array![[-1.0, 1.0], [1.0, 1.0]], vec![0.0, 0.0]),
                layer(array![[1.0, 1.0]], vec![0.0]),
            ],
            activation: Some(Activation::Relu),
        };
        // [2, 3] -> relu [2, 2] -> [0, 4] relu -> [0, 4] -> 4.
        assert_eq!(head_logits(&relu3, array![[2.0f32, 3.0]].view()), array![[4.0f32]]);
    }
}
