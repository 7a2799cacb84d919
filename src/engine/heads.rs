//! Heads as data on the host (issue 12, decision 3). A head reads only the first token of the last
//! layer (`[rows, H]`), so it runs here, from the task's AdapterHub weights, as two small matmuls
//! per task: no ONNX Runtime session per task and no gather of `[rows, T, H]` states for it.
//! Agrees with the task's `head.onnx` within 1e-6 of the logits' scale (tests/host_heads.rs).

use ndarray::{Array2, ArrayView2, ArrayView3, Axis, Zip, s};

use crate::repository::adapterhub::HeadWeights;

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
