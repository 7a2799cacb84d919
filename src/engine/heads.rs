//! Heads as data on the host (issue 12, decision 3). A head reads only the first token of the last
//! layer (`[rows, H]`), so it runs here, from the task's AdapterHub weights, as two small matmuls
//! per task: no ONNX Runtime session per task and no gather of `[rows, T, H]` states for it.
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

/// Runs `task`'s head over `rows` (each a row's real-token states `[len, H]`); one vector per row.
pub fn run_task_head(task: &Task, rows: &[ArrayView2<'_, f32>], source: HeadSource) -> Result<Vec<Vec<f32>>, EngineError> {
    if rows.is_empty() {
        return Ok(Vec::new());
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

/// `logits = W2 tanh(W1 h0 + b1) + b2` for each row of `first` (`[rows, H]`): `[rows, C]`.
/// f32 throughout, like ONNX Runtime's Gemm; the two differ only in summation order (measured: at
/// most 4.3e-7 of max(1, largest |logit|), tests/host_heads.rs).
pub fn head_logits(head: &HeadWeights, first: ArrayView2<'_, f32>) -> Array2<f32> {
    let mut z = first.dot(&head.w1.t());
    Zip::from(z.rows_mut()).for_each(|mut row| {
        Zip::from(&mut row).and(&head.b1).for_each(|v, b| *v = (*v + b).tanh());
    });
    let mut logits = z.dot(&head.w2.t());
    logits += &head.b2;
    logits
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
    use crate::repository::manifest::HeadKind;

    #[test]
    fn computes_the_two_layer_head() {
        let head = HeadWeights {
            kind: HeadKind::Classification,
            labels: vec!["a".into(), "b".into()],
            w1: array![[1.0, 0.0], [0.5, -1.0]],
            b1: Array1::from(vec![0.0, 0.25]),
            w2: array![[2.0, 0.0], [0.0, -1.0]],
            b2: Array1::from(vec![0.5, 1.0]),
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
}
