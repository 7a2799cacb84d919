//! Sentence-embedding pooling on the host, as sentence-transformers computes it: the mean of the
//! last hidden states over the attended tokens (`Pooling`, `pooling_mode_mean_tokens`) or the first
//! token's (`pooling_mode_cls_token`), then optionally L2-normalised (`Normalize`, eps 1e-12).

use ndarray::ArrayView2;

use crate::repository::embedding::{EmbeddingSpec, Pooling};

/// One embedding per row: `rows[i]` is a row's real-token states `[len, H]`, `masks[i]` its
/// attention mask (at least `len` entries; tokens with mask 0 do not count in the mean).
pub fn pool(spec: EmbeddingSpec, rows: &[ArrayView2<'_, f32>], masks: &[&[i64]]) -> Vec<Vec<f32>> {
    rows.iter().zip(masks).map(|(states, mask)| pool_row(spec, *states, mask)).collect()
}

fn pool_row(spec: EmbeddingSpec, states: ArrayView2<'_, f32>, mask: &[i64]) -> Vec<f32> {
    let hidden = states.ncols();
    let mut v: Vec<f64> = match spec.pooling {
        Pooling::Cls => states.row(0).iter().map(|x| f64::from(*x)).collect(),
        Pooling::Mean => {
            let mut sum = vec![0.0f64; hidden];
            let mut count = 0.0f64;
            for (token, _) in states.rows().into_iter().zip(mask).filter(|(_, m)| **m != 0) {
                count += 1.0;
                sum.iter_mut().zip(token).for_each(|(s, x)| *s += f64::from(*x));
            }
            // sentence-transformers clamps the token count at 1e-9 (an all-masked row is zeros).
            sum.iter().map(|s| s / count.max(1e-9)).collect()
        }
    };
    if spec.normalize {
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v.into_iter().map(|x| x as f32).collect()
}

#[cfg(test)]
mod tests {
    use ndarray::array;

    use super::*;

    #[test]
    fn mean_counts_attended_tokens_only_and_normalises() {
        let states = array![[1.0f32, 2.0], [3.0, 4.0], [100.0, 100.0]];
        let mean = EmbeddingSpec { pooling: Pooling::Mean, normalize: false };
        assert_eq!(pool(mean, &[states.view()], &[&[1, 1, 0]]), vec![vec![2.0, 3.0]]);
        let cls = EmbeddingSpec { pooling: Pooling::Cls, normalize: true };
        let got = &pool(cls, &[states.view()], &[&[1, 1, 1]])[0];
        let n = 5f32.sqrt();
        assert!((got[0] - 1.0 / n).abs() < 1e-7 && (got[1] - 2.0 / n).abs() < 1e-7, "{got:?}");
    }
}
