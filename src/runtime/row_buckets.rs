//! Row buckets for CUDA graphs (issue 12 item 6; `runtime.cuda_graphs`): the token layout of a
//! bank plan whose shapes depend on a few bucket sizes only, so a captured layer graph is replayed
//! by every batch with the same bucket signature, whatever its rows, tasks and lengths.
//!
//! Tokens are bucketed before this (`bound::pad_to_bucket`: every row at the batch's longest length
//! rounded up to a power of two). Here every stage's rows (entering a layer, after its attention
//! slot, after its FFN slot) are padded to the next power of two, and each slot takes **one group
//! per row** (`width` = the row length): the group maps are then row expansions whose shapes depend
//! on the row counts alone, where `packing::pack` groups tokens by bank row (fewer, wider groups,
//! whose shapes depend on the task mix). A layer's inputs thus have shapes fixed by
//! (rows in, rows after the attention slot, rows out, token bucket).
//!
//! Pad rows come after the real rows of their stage, so real rows keep their positions and the
//! heads read them where they always do. A pad row takes bank row 0 at both slots and in the
//! methods bank (the plain slot), continues row 0 of the stage before (any row would do: its states
//! are finite) and reads input row 0's mask; no real row continues a pad row, so a pad row's output
//! only ever reaches other pad rows. Pad rows cost compute (up to the real rows again), which a GPU
//! bound by launches rather than rows can afford; `make gpu-check` times it against packed runs.

use crate::engine::packing::{PackedLayer, PackedPlan, SlotGroups, TokenCounts};
use crate::engine::plan::{LayerPlan, Plan};

/// The rows a stage of `rows` rows is padded to: the next power of two.
pub fn row_bucket(rows: usize) -> usize {
    rows.max(1).next_power_of_two()
}

/// `plan` with every stage padded to its row bucket (module docs), laid out with every row `seq`
/// tokens long and one group per row. `real[i]`: input row `i`'s real length (token accounting).
/// `rows_per_layer` stays the real rows (what `ExecStats` reports); the heads' rows are unchanged.
pub fn bucket(plan: &Plan, seq: usize, real: &[usize]) -> (Plan, PackedPlan) {
    let pad = |v: &[i64], to: usize| -> Vec<i64> { v.iter().copied().chain(std::iter::repeat(0)).take(to.max(v.len())).collect() };
    let mut out = plan.clone();
    let entering = row_bucket(plan.embedding_rows.len());
    out.embedding_rows.resize(entering, 0);
    out.embedding_invertible.resize(entering, 0);
    let mut rows_in = entering;
    let mut layout = PackedPlan::default();
    let mut counts = TokenCounts::default();
    for (lp, padded) in plan.layers.iter().zip(out.layers.iter_mut()) {
        let (rows_mid, rows_out) = (row_bucket(lp.attention_rows.len()), row_bucket(lp.ffn_rows.len()));
        *padded = LayerPlan {
            input_rows: lp.input_rows.iter().copied().chain(std::iter::repeat(0)).take(rows_in).collect(),
            methods_index: pad(&lp.methods_index, rows_in),
            attention_rows: pad(&lp.attention_rows, rows_mid),
            attention_index: pad(&lp.attention_index, rows_mid),
            ffn_rows: pad(&lp.ffn_rows, rows_out),
            ffn_index: pad(&lp.ffn_index, rows_out),
        };
        let positions: Vec<i64> = (0..(rows_in * seq) as i64).collect();
        let identity: Vec<i64> = (0..rows_in as i64).collect();
        let methods_mid: Vec<i64> = padded.attention_rows.iter().map(|&r| padded.methods_index[r as usize]).collect();
        let identity_mid: Vec<i64> = (0..rows_mid as i64).collect();
        layout.layers.push(PackedLayer {
            tokens: rows_in * seq,
            seq,
            gather: positions.clone(),
            scatter: positions,
            attention: row_groups(&padded.attention_rows, &padded.attention_index, seq),
            ffn: row_groups(&padded.ffn_rows, &padded.ffn_index, seq),
            methods: row_groups(&identity, &padded.methods_index, seq),
            methods_ffn: row_groups(&identity_mid, &methods_mid, seq),
        });
        counts.real += lp.input_rows.iter().map(|&i| real[i]).sum::<usize>();
        counts.computed += rows_in * seq;
        counts.attention += rows_in * seq;
        counts.slot += (rows_mid + rows_out) * seq;
        layout.most_tokens = layout.most_tokens.max(rows_out.max(rows_mid) * seq);
        rows_in = rows_out;
    }
    layout.final_starts = (0..plan.final_inputs.len()).map(|r| r * seq).collect();
    layout.counts = counts;
    (out, layout)
}

/// One group per row leaving a slot: row `k` continues entering row `rows[k]` (its `seq` tokens)
/// with bank row `index[k]`; the tokens leave in row order.
fn row_groups(rows: &[i64], index: &[i64], seq: usize) -> SlotGroups {
    let seq64 = seq as i64;
    SlotGroups {
        group: rows.iter().flat_map(|&r| r * seq64..(r + 1) * seq64).collect(),
        width: seq,
        index: index.to_vec(),
        ungroup: (0..(rows.len() * seq) as i64).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::plan::{LanePath, plan};

    fn lane(index: &[[u32; 2]], rows: &[usize], head: usize) -> LanePath {
        LanePath { index: index.to_vec(), methods: Vec::new(), rows: rows.to_vec(), head, invertible: 0 }
    }

    /// Per layer: (rows in, rows after the attention slot, rows out), what a layer's input shapes depend on.
    fn signature(p: &Plan) -> Vec<(usize, usize, usize)> {
        p.layers.iter().map(|l| (l.input_rows.len(), l.attention_rows.len(), l.ffn_rows.len())).collect()
    }

    #[test]
    fn stages_pad_to_powers_of_two_after_the_real_rows_on_bank_row_zero() {
        // Three inputs; lane 1 splits every row at layer 1's FFN slot.
        let p = plan(&[lane(&[[0, 0], [0, 3]], &[0, 1, 2], 0), lane(&[[0, 0], [0, 0]], &[0, 1, 2], 1)], 3, 2);
        let (b, layout) = bucket(&p, 16, &[5, 9, 16]);
        assert_eq!(signature(&p), vec![(3, 3, 3), (3, 3, 6)]);
        assert_eq!(signature(&b), vec![(4, 4, 4), (4, 4, 8)]);
        assert_eq!(b.embedding_rows, vec![0, 1, 2, 0]);
        let l1 = &b.layers[1];
        assert_eq!(l1.ffn_rows[..6], p.layers[1].ffn_rows[..], "real rows first, unchanged");
        assert_eq!((&l1.ffn_rows[6..], &l1.ffn_index[6..]), (&[0, 0][..], &[0, 0][..]), "pads: bank row 0");
        assert_eq!(
            (b.final_inputs.clone(), b.heads.clone(), b.rows_per_layer.clone()),
            (p.final_inputs.clone(), p.heads, p.rows_per_layer)
        );
        // Layout: every row 16 tokens, one group per row, tokens leave in row order.
        let t = &layout.layers[1];
        assert_eq!((t.tokens, t.seq, t.ffn.width, t.ffn.groups()), (64, 16, 16, 8));
        assert_eq!(t.ffn.group[16..32], (0..16).collect::<Vec<i64>>()[..], "output row 1 continues row 0");
        assert_eq!(t.ffn.ungroup, (0..128).collect::<Vec<i64>>());
        assert_eq!(layout.final_starts, vec![0, 16, 32, 48, 64, 80]);
        assert_eq!(layout.most_tokens, 128);
        assert_eq!(layout.counts.real, 2 * 30, "real tokens, pads not counted");
        assert!(t.attention.group.iter().chain(&t.gather).all(|&i| (0..64).contains(&i)), "maps stay inside the layer's tokens");
    }

    #[test]
    fn batches_of_other_rows_and_task_mixes_share_a_signature() {
        // Rows 5..=8, one task or each row its own task (adapters at the FFN slot of every layer):
        // eight batch shapes, one bucket signature.
        let mut seen = std::collections::HashSet::new();
        for rows in 5..=8 {
            for distinct in [false, true] {
                let lanes: Vec<LanePath> =
                    (0..rows).map(|r| lane(&[[0, if distinct { r as u32 + 1 } else { 1 }]; 2], &[r], usize::from(distinct) * r)).collect();
                let (b, layout) = bucket(&plan(&lanes, rows, 2), 8, &vec![8; rows]);
                let shapes: Vec<_> =
                    layout.layers.iter().map(|l| (l.gather.len(), l.attention.group.len(), l.ffn.group.len(), l.ffn.index.len())).collect();
                seen.insert((signature(&b), shapes));
            }
        }
        assert_eq!(seen.len(), 1, "{seen:?}");
    }
}
