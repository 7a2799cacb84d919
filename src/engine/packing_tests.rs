use super::*;
use crate::engine::plan::{BankIndex, LanePath, plan};

fn lane(index: &[[BankIndex; 2]], rows: &[usize], head: usize) -> LanePath {
    LanePath { index: index.to_vec(), methods: Vec::new(), rows: rows.to_vec(), head, invertible: 0 }
}

/// Checks one slot's maps by meaning: every token of output row `k` is, at its ungroup position,
/// the same position of the entering row it continues, in a group of its bank row; pads are valid.
fn check_slot(lens: &[usize], rows: &[i64], index: &[i64], g: &SlotGroups) {
    let starts = starts(lens);
    assert_eq!(g.group.len(), g.groups() * g.width);
    let entering = starts[lens.len()] as i64;
    assert!(g.group.iter().all(|&t| (0..entering.max(1)).contains(&t)), "group tokens in range");
    let mut k_tok = 0;
    for (&r, &b) in rows.iter().zip(index) {
        for p in 0..lens[r as usize] {
            let at = g.ungroup[k_tok] as usize;
            assert_eq!(g.group[at], (starts[r as usize] + p) as i64, "token {k_tok}");
            assert_eq!(g.index[at / g.width], b, "bank row of token {k_tok}");
            k_tok += 1;
        }
    }
    assert_eq!(k_tok, g.ungroup.len());
    let mut seen = g.ungroup.clone();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), g.ungroup.len(), "no two tokens share a group position");
}

/// Checks a whole packed plan against its row plan.
fn check(p: &Plan, lens: &[usize]) -> PackedPlan {
    let packed = pack(p, lens, lens);
    for (lp, pl) in p.layers.iter().zip(&packed.layers) {
        let lens0: Vec<usize> = lp.input_rows.iter().map(|&i| lens[i]).collect();
        assert_eq!(pl.tokens, lens0.iter().sum::<usize>());
        assert_eq!(pl.seq, lens0.iter().copied().max().unwrap());
        let s0 = starts(&lens0);
        for (r, &n) in lens0.iter().enumerate() {
            for q in 0..n {
                assert_eq!(pl.gather[r * pl.seq + q], (s0[r] + q) as i64);
                assert_eq!(pl.scatter[s0[r] + q], (r * pl.seq + q) as i64);
            }
        }
        check_slot(&lens0, &lp.attention_rows, &lp.attention_index, &pl.attention);
        let lens1: Vec<usize> = lp.attention_rows.iter().map(|&r| lens0[r as usize]).collect();
        check_slot(&lens1, &lp.ffn_rows, &lp.ffn_index, &pl.ffn);
        let ident = |n: usize| (0..n as i64).collect::<Vec<_>>();
        check_slot(&lens0, &ident(lens0.len()), &lp.methods_index, &pl.methods);
        let index1: Vec<i64> = lp.attention_rows.iter().map(|&r| lp.methods_index[r as usize]).collect();
        check_slot(&lens1, &ident(lens1.len()), &index1, &pl.methods_ffn);
    }
    let fl: Vec<usize> = p.final_inputs.iter().map(|&i| lens[i]).collect();
    assert_eq!(packed.final_starts, starts(&fl)[..fl.len()].to_vec());
    packed
}

#[test]
fn one_task_mixed_lengths_has_no_padding_outside_attention() {
    let lens = [1, 5, 3, 12];
    let p = plan(&[lane(&[[0, 2], [0, 2]], &[0, 1, 2, 3], 0)], 4, 2);
    let packed = check(&p, &lens);
    for l in &packed.layers {
        assert_eq!(l.tokens, 21);
        assert_eq!(l.seq, 12);
        for g in [&l.attention, &l.ffn] {
            assert_eq!(g.groups(), 1);
            assert_eq!(g.group, (0..21).collect::<Vec<i64>>());
            assert_eq!(g.ungroup, (0..21).collect::<Vec<i64>>());
        }
    }
    assert_eq!(packed.counts, TokenCounts { real: 42, computed: 42, attention: 2 * 4 * 12, slot: 4 * 21 });
    assert_eq!(packed.final_starts, vec![0, 1, 6, 9]);
}

#[test]
fn row_expansion_becomes_token_maps() {
    // Lane 0: ffn adapters from layer 1; lane 1: dropped until layer 2 (rows split at layer 1's ffn).
    let a = lane(&[[0, 0], [0, 3], [0, 3]], &[0, 1], 0);
    let b = lane(&[[0, 0], [0, 0], [5, 5]], &[0, 1], 1);
    let p = plan(&[a, b], 2, 3);
    let packed = check(&p, &[2, 4]);
    assert_eq!(packed.layers.iter().map(|l| l.tokens).collect::<Vec<_>>(), vec![6, 6, 12]);
    // layer 1's FFN slot: rows (0,3) (0,0) (1,3) (1,0): two bank rows of 6 tokens each, no padding
    let ffn = &packed.layers[1].ffn;
    assert_eq!((ffn.groups(), ffn.width), (2, 6));
    assert_eq!(ffn.index, vec![3, 0]);
    assert_eq!(ffn.group, vec![0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]);
    assert_eq!(ffn.ungroup, vec![0, 1, 6, 7, 2, 3, 4, 5, 8, 9, 10, 11]);
    assert_eq!(packed.final_starts, vec![0, 2, 4, 8]);
}

#[test]
fn mixed_tasks_and_depths_map_every_token() {
    // Several tasks, drop depths and plain rows over rows of 1 to 40 tokens; a lane twice on one row.
    let lens = [1, 40, 7, 7, 23, 2];
    let lanes = [
        lane(&[[0, 0], [1, 1], [1, 1]], &[0, 1, 2], 0),
        lane(&[[0, 0], [0, 0], [2, 2]], &[1, 3, 4], 1),
        lane(&[[0, 4], [0, 4], [0, 4]], &[4, 5, 0], 2),
        lane(&[[0, 0], [0, 0], [0, 0]], &[2, 5], 3),
        lane(&[[0, 4], [0, 4], [0, 4]], &[5, 5], 2),
    ];
    let p = plan(&lanes, lens.len(), 3);
    let packed = check(&p, &lens);
    let real: usize = lens.iter().sum();
    assert_eq!(packed.layers[0].tokens, real);
    assert!(packed.counts.attention >= packed.counts.computed);
}

#[test]
fn padded_layout_computes_every_row_at_the_longest_length() {
    let p = plan(&[lane(&[[0, 1]], &[0, 1, 2], 0)], 3, 1);
    let packed = pack(&p, &[9, 9, 9], &[2, 9, 4]);
    assert_eq!(packed.counts, TokenCounts { real: 15, computed: 27, attention: 27, slot: 54 });
}

#[test]
fn group_width_bounds_slot_padding() {
    // One long document of one task beside many short queries of other tasks.
    let mut sizes = vec![512];
    sizes.extend(std::iter::repeat_n(10, 255));
    let w = width(&sizes);
    let total: usize = sizes.iter().sum();
    let computed: usize = sizes.iter().map(|&n| n.div_ceil(w) * w).sum();
    assert!(computed <= 2 * total + sizes.len(), "width {w}: {computed} positions for {total} tokens");
    assert_eq!(width(&[37]), 37);
    assert_eq!(width(&[8, 8, 8]), 8);
    assert_eq!(width(&[]), 1);
}

#[test]
fn long_bank_rows_span_several_groups() {
    // Bank row 1 holds 30 tokens, rows 2 and 3 hold 3 each: width 3 cuts row 1 into 10 groups.
    let lens = [30, 3, 3];
    let rows = [0i64, 1, 2];
    let g = group(&lens, &starts(&lens), &rows, &[1, 2, 3]);
    check_slot(&lens, &rows, &[1, 2, 3], &g);
    assert_eq!(g.width, 3);
    assert_eq!(g.groups(), 12);
    assert_eq!(g.group.len(), 36);
}

#[test]
fn methods_rows_group_the_tokens_before_each_layer() {
    // Lane 0: LoRA row 2 from layer 1; lane 1: (IA)^3 row 1 at both layers (its rows split before
    // layer 0); lane 2: plain. Rows of 3 and 5 tokens.
    let mut a = lane(&[[0, 0]; 2], &[0, 1], 0);
    a.methods = vec![0, 2];
    let mut b = lane(&[[0, 0]; 2], &[1], 1);
    b.methods = vec![1, 1];
    let p = plan(&[a, b, lane(&[[0, 0]; 2], &[0], 2)], 2, 2);
    let packed = check(&p, &[3, 5]);
    let rows_in_order = |l: usize| {
        let mut v = packed.layers[l].methods.index.clone();
        v.dedup();
        v
    };
    assert_eq!(rows_in_order(0), vec![0, 1], "layer 0: the plain tokens, then lane 1's");
    assert_eq!(rows_in_order(1), vec![2, 0, 1], "layer 1: lane 0's LoRA, plain, lane 1's");
    assert_eq!(packed.layers[1].tokens, 3 + 3 + 5 + 5, "input 0 twice (lanes 0 and 2), input 1 twice");
}
