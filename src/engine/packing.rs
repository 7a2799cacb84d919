//! The token layout of a bank plan (issue 15, packed tokens): pure, no ONNX Runtime, like `plan.rs`.
//!
//! `layer.onnx` works on packed tokens: the states are `[tokens, H]`, the tokens of every physical
//! row one after the other, so per-token work computes no padding. This module turns the plan's row
//! maps into the graph's token maps: where each row's tokens sit for attention (`[rows, T]`, the only
//! padded product) and, per slot, which tokens share a bank row (groups, so weights are gathered once
//! per group) and where each token leaving the slot comes from (AdapterDrop's row expansion).

use std::collections::HashMap;

use super::plan::{LayerPlan, Plan};

/// One slot's tokens grouped by bank row (`<loc>_group`, `<loc>_index`, `<loc>_ungroup`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SlotGroups {
    /// `[groups, width]` row-major: the entering token at each group position (pads: token 0, dropped).
    pub group: Vec<i64>,
    pub width: usize,
    /// Bank row of each group; a bank row with more tokens than `width` spans several groups.
    pub index: Vec<i64>,
    /// For each token leaving the slot (rows in the plan's order): its position `g * width + s`.
    pub ungroup: Vec<i64>,
}

impl SlotGroups {
    pub fn groups(&self) -> usize {
        self.index.len()
    }
}

/// The token maps of one layer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PackedLayer {
    /// Tokens entering the layer (the rows of `hidden`).
    pub tokens: usize,
    /// Longest entering row: attention's padded length.
    pub seq: usize,
    /// `[rows, seq]` row-major: the entering token at each row position (pads: token 0, masked).
    pub gather: Vec<i64>,
    /// For each entering token: its position `row * seq + p` in attention's layout.
    pub scatter: Vec<i64>,
    pub attention: SlotGroups,
    pub ffn: SlotGroups,
    /// The entering tokens grouped by LoRA / (IA)^3 row (the attention projections), and the
    /// tokens after the attention slot likewise (the FFN projections); order kept.
    pub methods: SlotGroups,
    pub methods_ffn: SlotGroups,
}

/// Token positions a batch computes, summed over its layers (`ExecStats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenCounts {
    /// Real tokens entering each layer's per-token work.
    pub real: usize,
    /// Tokens the per-token work computes (real, or padded rows when packing is off).
    pub computed: usize,
    /// Positions inside attention's score and context products, padding included.
    pub attention: usize,
    /// Positions inside the adapter slots' groups, padding included.
    pub slot: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PackedPlan {
    pub layers: Vec<PackedLayer>,
    /// First token of each physical row leaving the last layer (`Plan::final_inputs` order).
    pub final_starts: Vec<usize>,
    /// Most tokens any layer holds (entering or leaving), for the memory budget.
    pub most_tokens: usize,
    pub counts: TokenCounts,
}

/// Lays `plan` out on tokens. `lens[i]`: the tokens input row `i` takes in the layout (its length
/// when packed; the batch's longest for the padded A/B); `real[i]`: its real length (accounting).
pub fn pack(plan: &Plan, lens: &[usize], real: &[usize]) -> PackedPlan {
    let mut out = PackedPlan::default();
    let mut counts = TokenCounts::default();
    for lp in &plan.layers {
        let lens0: Vec<usize> = lp.input_rows.iter().map(|&i| lens[i]).collect();
        let starts0 = starts(&lens0);
        let tokens = starts0.last().copied().unwrap_or(0);
        let seq = lens0.iter().copied().max().unwrap_or(0);
        let mut gather = vec![0i64; lens0.len() * seq];
        let mut scatter = Vec::with_capacity(tokens);
        for (r, (&n, &s)) in lens0.iter().zip(&starts0).enumerate() {
            for p in 0..n {
                gather[r * seq + p] = (s + p) as i64;
                scatter.push((r * seq + p) as i64);
            }
        }
        let attention = group(&lens0, &starts0, &lp.attention_rows, &lp.attention_index);
        let lens1: Vec<usize> = lp.attention_rows.iter().map(|&r| lens0[r as usize]).collect();
        let ffn = group(&lens1, &starts(&lens1), &lp.ffn_rows, &lp.ffn_index);
        let tokens2: usize = lp.ffn_rows.iter().map(|&r| lens1[r as usize]).sum();
        let (methods, methods_ffn) = methods_groups(lp, &lens0, &starts0, &lens1);
        counts.real += lp.input_rows.iter().map(|&i| real[i]).sum::<usize>();
        counts.computed += tokens;
        counts.attention += lens0.len() * seq;
        counts.slot += attention.group.len() + ffn.group.len();
        out.most_tokens = out.most_tokens.max(tokens).max(lens1.iter().sum()).max(tokens2);
        out.layers.push(PackedLayer { tokens, seq, gather, scatter, attention, ffn, methods, methods_ffn });
    }
    let final_lens: Vec<usize> = plan.final_inputs.iter().map(|&i| lens[i]).collect();
    out.final_starts = starts(&final_lens);
    out.final_starts.pop();
    out.counts = counts;
    out
}

/// The methods groups of one layer: entering row j takes `methods_index[j]`, and every row after the
/// attention slot the row it continues; no row is expanded (the plan split them before the layer).
fn methods_groups(lp: &LayerPlan, lens0: &[usize], starts0: &[usize], lens1: &[usize]) -> (SlotGroups, SlotGroups) {
    let ident = |n: usize| (0..n as i64).collect::<Vec<_>>();
    let methods = group(lens0, starts0, &ident(lens0.len()), &lp.methods_index);
    let index1: Vec<i64> = lp.attention_rows.iter().map(|&r| lp.methods_index.get(r as usize).copied().unwrap_or(0)).collect();
    (methods, group(lens1, &starts(lens1), &ident(lens1.len()), &index1))
}

/// Offsets of rows of `lens` tokens packed in order, plus the total at the end.
fn starts(lens: &[usize]) -> Vec<usize> {
    let mut s = Vec::with_capacity(lens.len() + 1);
    let mut at = 0;
    s.push(0);
    for &n in lens {
        at += n;
        s.push(at);
    }
    s
}

/// Groups the tokens of the rows leaving a slot (`rows[k]`: the entering row output row `k`
/// continues, `index[k]` its bank row) by bank row, in order of first use, then cuts each bank
/// row's tokens into groups of one width chosen to pad least (see [`width`]).
fn group(lens: &[usize], starts: &[usize], rows: &[i64], index: &[i64]) -> SlotGroups {
    let mut order: Vec<(i64, Vec<i64>)> = Vec::new();
    let mut slot_of: HashMap<i64, usize> = HashMap::new();
    // (bank slot, position inside it) of each output row's first token
    let mut at = Vec::with_capacity(rows.len());
    for (&r, &b) in rows.iter().zip(index) {
        let k = *slot_of.entry(b).or_insert_with(|| {
            order.push((b, Vec::new()));
            order.len() - 1
        });
        let (r, members) = (r as usize, &mut order[k].1);
        at.push((k, members.len()));
        members.extend((starts[r]..starts[r] + lens[r]).map(|t| t as i64));
    }
    let sizes: Vec<usize> = order.iter().map(|(_, m)| m.len()).collect();
    let width = width(&sizes);
    // first group of each bank row
    let mut first = Vec::with_capacity(order.len());
    let (mut group, mut idx) = (Vec::new(), Vec::new());
    for (b, members) in &order {
        first.push(idx.len());
        for chunk in members.chunks(width) {
            group.extend_from_slice(chunk);
            group.resize(group.len() + width - chunk.len(), 0);
            idx.push(*b);
        }
        if members.is_empty() {
            // a zero-length row: one empty group keeps the maps well formed
            group.resize(group.len() + width, 0);
            idx.push(*b);
        }
    }
    let mut ungroup = Vec::with_capacity(lens.len());
    for (&r, &(k, p)) in rows.iter().zip(&at) {
        let base = first[k] * width;
        ungroup.extend((0..lens[r as usize]).map(|j| (base + p + j) as i64));
    }
    SlotGroups { group, width, index: idx, ungroup }
}

/// The group width that pads least for bank rows holding `sizes` tokens: a row of `n` tokens takes
/// `ceil(n / w)` groups of `w`. One bank row: its size, no padding. Candidates are the sizes
/// themselves and the mean, so the result pads at most `w - 1` per bank row with `w` no larger than
/// the mean: computed slot positions stay under twice the tokens plus the bank rows, however unequal
/// the groups (one long document beside many short queries of other tasks).
pub fn width(sizes: &[usize]) -> usize {
    let total: usize = sizes.iter().sum();
    if total == 0 {
        return 1;
    }
    let cost = |w: usize| sizes.iter().map(|&n| n.div_ceil(w).max(1) * w).sum::<usize>();
    let mean = total.div_ceil(sizes.len().max(1));
    sizes.iter().copied().chain([mean]).filter(|&w| w > 0).min_by_key(|&w| (cost(w), std::cmp::Reverse(w))).unwrap_or(1)
}

#[cfg(test)]
#[path = "packing_tests.rs"]
mod tests;
