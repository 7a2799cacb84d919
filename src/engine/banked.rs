//! The CPU runner of a bank plan (`plan.rs`, laid out on tokens by `packing.rs`): embeddings, then
//! one `layer.onnx` run per layer on packed tokens with the backbone's adapter banks as inputs, then
//! the heads on the host. A batch costs 1 + L session runs whatever tasks and drop depths it mixes
//! (plus one per task whose head is only a graph, and ELECTRA's `embeddings_project` where a row
//! has a Stack's invertible adapter).
//!
//! The embeddings run padded (`[rows, T]`, the graph every path shares) and are packed on the host:
//! one copy of the real tokens' states, a small fraction of one layer's work, and no second
//! embeddings graph with a positions input to keep exact for every backbone family.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ndarray::{Array1, Array2, ArrayView2, ArrayViewD, Axis, Ix2, s};
use ort::memory::AllocationDevice;
use ort::session::SessionInputValue;
use ort::value::{DynValue, TensorRef, TensorValueType};

use super::executor::{ExecStats, Lane, Sequence, large_batch, pad};
use super::heads::{HeadSource, LaneOutput, run_task_head};
use super::packing::{PackedLayer, PackedPlan, SlotGroups, pack};
use super::plan::{HeadGroup, LanePath, plan};
use super::tensors::{f32_input, i64_input, run_hidden};
use crate::error::EngineError;
use crate::repository::backbone::{BANK_INPUTS, GROUP_INPUTS, METHOD_GROUP_INPUTS, METHOD_INPUTS};
use crate::repository::{Backbone, Location};

/// `engine.packing` (set at start-up): packed tokens, or every row at the batch's longest length.
static PACKING: AtomicBool = AtomicBool::new(true);

/// Sets the token layout of bank batches (`engine.packing`; false is the padded A/B).
pub fn set_packing(on: bool) {
    PACKING.store(on, Ordering::Relaxed);
}

/// Runs `lanes` on the bank path in the configured layout; one output per lane, as `execute` returns.
pub fn execute_banked(backbone: &Backbone, seqs: &[Sequence], lanes: &[Lane]) -> Result<(Vec<LaneOutput>, ExecStats), EngineError> {
    execute_banked_as(backbone, seqs, lanes, PACKING.load(Ordering::Relaxed))
}

/// [`execute_banked`] with the layout given: `packed` false feeds every row at the batch's longest
/// length, pads included as tokens (today's padded work, for the A/B).
pub fn execute_banked_as(
    backbone: &Backbone,
    seqs: &[Sequence],
    lanes: &[Lane],
    packed: bool,
) -> Result<(Vec<LaneOutput>, ExecStats), EngineError> {
    let banked =
        backbone.banked.as_ref().ok_or_else(|| EngineError::Contract(format!("backbone `{}` has no layer graphs", backbone.name())))?;
    if let Some(i) = seqs.iter().position(|s| s.ids.is_empty()) {
        return Err(EngineError::Contract(format!("sequence {i} of the batch has no tokens")));
    }
    let runs = crate::runtime::session_runs();
    let mut store = banked.banks.store();
    let layers = backbone.num_layers();
    let invertible = |l: usize| lanes[l].task.adapterhub.as_ref().and_then(|w| w.stack.as_ref()).and_then(|s| s.invertible.as_ref());
    let paths: Vec<LanePath> = lanes
        .iter()
        .enumerate()
        .map(|(l, lane)| {
            let id = lane.task.bank.as_ref().map(|b| b.rows.id());
            let index = (0..layers)
                .map(|l| match id {
                    Some(id) if lane.active.0[l] => [store.index(id, l, Location::Attention), store.index(id, l, Location::Ffn)],
                    _ => [0, 0],
                })
                .collect();
            let methods = (0..layers)
                .map(|l| match id {
                    Some(id) if lane.active.0[l] => store.method_index(id, l),
                    _ => 0,
                })
                .collect();
            // Lanes of one task share its invertible adapter: the key is its first lane's number + 1.
            let first = lanes.iter().position(|o| Arc::ptr_eq(&o.task, &lane.task)).unwrap_or(l);
            let inv = if invertible(l).is_some() { first as u32 + 1 } else { 0 };
            LanePath { index, methods, rows: lane.rows.clone(), head: Arc::as_ptr(&lane.task) as usize, invertible: inv }
        })
        .collect();
    let plan = plan(&paths, seqs.len(), layers);
    let (ids, types, mask) = pad(seqs, backbone.manifest.pad_token_id);
    // `runtime.cuda_graphs`: every row at a bucketed length (the padded layout), so that batches of
    // one task mix and row count share a captured graph whatever their lengths.
    let capture = banked.bound.as_ref().is_some_and(|b| b.captures());
    let (ids, types, mask, packed) = match capture {
        true => crate::runtime::bound::pad_to_bucket(ids, types, mask, backbone.manifest.pad_token_id, backbone.manifest.max_positions),
        false => (ids, types, mask, packed),
    };
    let real: Vec<usize> = seqs.iter().map(|s| s.ids.len()).collect();
    let lens: Vec<usize> = if packed { real.clone() } else { vec![ids.ncols(); seqs.len()] };
    // Under `runtime.cuda_graphs` rows are padded to buckets too, one slot group per row, so the
    // layers' input shapes depend on bucket sizes only (`runtime/row_buckets.rs`).
    let (plan, layout) = if capture {
        crate::runtime::row_buckets::bucket(&plan, ids.ncols(), &real)
    } else {
        let layout = pack(&plan, &lens, &real);
        (plan, layout)
    };
    let (iv, tv) = (ids.view(), types.view());
    // ELECTRA's invertible adapter comes before `embeddings_project`: a batch with one takes the
    // states before it (`embedded`) and projects every row after (rows without one bit for bit as
    // `hidden`); every other batch reads `hidden` as before.
    let project = backbone.embeddings_project.as_ref().filter(|_| plan.embedding_invertible.iter().any(|&k| k != 0));
    let output = if project.is_some() { "embedded" } else { "hidden" };
    let embedded = run_hidden(&backbone.embeddings, vec![("input_ids", i64_input(&iv)?), ("token_type_ids", i64_input(&tv)?)], output)?;
    // Rows split before layer 0 (their LoRA / (IA)^3 rows differ there) are packed once per copy.
    let embedded = embedded.into_host()?;
    let identity = plan.embedding_rows.iter().enumerate().all(|(i, &r)| i == r) && plan.embedding_rows.len() == seqs.len();
    let mut embedded = if identity { embedded } else { embedded.select(Axis(0), &plan.embedding_rows) };
    // A Stack's invertible adapter, on the host (a few small products per row), at every drop depth.
    for (r, &key) in plan.embedding_invertible.iter().enumerate() {
        if let Some(inv) = usize::try_from(key - 1).ok().and_then(invertible) {
            inv.apply(embedded.index_axis_mut(Axis(0), r));
        }
    }
    if let Some(project) = project {
        let ev = embedded.view();
        embedded = run_hidden(project, vec![("embedded", f32_input(&ev)?)], "hidden")?.into_host()?;
    }
    let embedding_lens: Vec<usize> = plan.embedding_rows.iter().map(|&i| lens[i]).collect();
    let mut hidden = Packed::Host(pack_rows(embedded, &embedding_lens));
    let mut stats =
        ExecStats { padded_len: ids.ncols(), layer_rows: plan.rows_per_layer.clone(), bank_lanes: lanes.len(), ..Default::default() };
    // A batch larger than the batch budget gives its memory back (as `execute` does): the last
    // layer run shrinks the arena, then the heap is trimmed.
    let large = large_batch(layout.most_tokens);
    // `runtime.io_binding`: banks bound from their device mirrors, layer outputs in preallocated
    // device buffers, one synchronisation per batch (`runtime/bound.rs`).
    let mut bound = banked.bound.as_ref().map(|b| b.begin(&banked.layers, &mut store, layout.most_tokens)).transpose()?;
    for (layer, (lp, tl)) in plan.layers.iter().zip(&layout.layers).enumerate() {
        if large && layer + 1 == layers {
            crate::runtime::shrink_arena_after_next_run();
        }
        stats.adapter_rows += lp.attention_index.iter().chain(&lp.ffn_index).filter(|&&i| i != 0).count();
        let attention_mask = attention_mask(&mask, &lp.input_rows, tl.seq);
        let maps = LayerMaps::new(tl);
        let mv = attention_mask.view();
        let mut inputs: Vec<(&'static str, SessionInputValue<'_>)> = Vec::new();
        // The IoBinding runner feeds layers after the first from its own buffer.
        if bound.is_none() || layer == 0 {
            inputs.push(("hidden", hidden.input()?));
        }
        inputs.push(("attention_gather", TensorRef::from_array_view(maps.gather.view())?.into()));
        inputs.push(("attention_mask", i64_input(&mv)?));
        inputs.push(("attention_scatter", TensorRef::from_array_view(maps.scatter.view())?.into()));
        for (names, g) in GROUP_INPUTS.iter().chain(&METHOD_GROUP_INPUTS).zip(&maps.groups) {
            inputs.push((names[0], TensorRef::from_array_view(g.0.view())?.into()));
            inputs.push((names[1], TensorRef::from_array_view(g.1.view())?.into()));
            inputs.push((names[2], TensorRef::from_array_view(g.2.view())?.into()));
        }
        // Bank tensors reach the runner through `runtime::bound::bank_tensors` (a new bank input
        // belongs there too); everything pushed above is per batch.
        if let Some(bound) = bound.as_mut() {
            if let Some(out) = bound.run(layer, inputs, tl.ffn.ungroup.len(), layer + 1 == layers)? {
                hidden = Packed::Host(out);
            }
            continue;
        }
        let methods = store.methods(layer);
        for (names, t) in METHOD_INPUTS.iter().zip(&methods.targets) {
            for (name, a) in names.iter().zip([&t.lora_a, &t.lora_b, &t.scale]) {
                inputs.push((name, TensorRef::from_array_view(a.view())?.into()));
            }
        }
        let banks = [Location::Attention, Location::Ffn].map(|l| store.bank(layer, l));
        let stacks = [Location::Attention, Location::Ffn].map(|l| store.stack_bank(layer, l));
        for (names, bank) in BANK_INPUTS.iter().zip(banks.into_iter().chain(stacks)) {
            for (name, t) in names.iter().zip([&bank.down_w, &bank.down_b, &bank.up_w, &bank.up_b, &bank.rule]) {
                inputs.push((name, TensorRef::from_array_view(t.view())?.into()));
            }
        }
        hidden = Packed::Ort(banked.layers[layer].run_on_device(inputs, "y")?);
    }
    drop(bound);
    drop(store);
    // Heads read the states in place where they are host memory (CPU), else after one copy to the host.
    let hidden = hidden.on_host()?;
    let view = hidden.view()?;
    let final_real: Vec<usize> = plan.final_inputs.iter().map(|&i| real[i]).collect();
    let final_masks: Vec<&[i64]> = plan.final_inputs.iter().map(|&i| seqs[i].mask.as_slice()).collect();
    let logits = heads(view, &layout, &final_real, &final_masks, lanes, &plan.heads);
    if large {
        crate::runtime::trim_heap();
    }
    let logits = logits?;
    stats.graph_runs = (crate::runtime::session_runs() - runs) as usize;
    (stats.real_tokens, stats.computed_tokens, stats.attention_tokens) =
        (layout.counts.real, layout.counts.computed, layout.counts.attention);
    Ok((logits, stats))
}

/// The packed hidden states `[tokens, H]`: the host copy made from the embeddings, or a layer's
/// output where ONNX Runtime put it (fed to the next layer without a copy).
enum Packed {
    Host(Array2<f32>),
    Ort(DynValue),
}

impl Packed {
    /// Host memory as it is (CPU sessions' outputs are read in place); GPU states copied down.
    fn on_host(self) -> Result<Self, EngineError> {
        match self {
            Self::Ort(v) if v.try_extract_array::<f32>().is_err() => {
                let host = v.downcast::<TensorValueType<f32>>()?.to(AllocationDevice::CPU, 0)?;
                Ok(Self::Host(rank2(host.extract_array())?.to_owned()))
            }
            other => Ok(other),
        }
    }

    fn view(&self) -> Result<ArrayView2<'_, f32>, EngineError> {
        match self {
            Self::Host(a) => Ok(a.view()),
            Self::Ort(v) => rank2(v.try_extract_array::<f32>()?),
        }
    }

    fn input(&self) -> Result<SessionInputValue<'_>, EngineError> {
        Ok(match self {
            Self::Host(a) => TensorRef::from_array_view(a.view())?.into(),
            Self::Ort(v) => v.into(),
        })
    }
}

/// One layer's token maps as arrays the graph reads.
struct LayerMaps {
    gather: Array2<i64>,
    scatter: Array1<i64>,
    /// Attention slot, FFN slot, then the LoRA / (IA)^3 groups of the attention and FFN projections.
    groups: [(Array2<i64>, Array1<i64>, Array1<i64>); 4],
}

impl LayerMaps {
    fn new(tl: &PackedLayer) -> Self {
        let rows = tl.gather.len().checked_div(tl.seq).unwrap_or(0);
        let group = |g: &SlotGroups| {
            let grouped = Array2::from_shape_vec((g.groups(), g.width), g.group.clone()).expect("groups x width maps");
            (grouped, Array1::from(g.index.clone()), Array1::from(g.ungroup.clone()))
        };
        Self {
            gather: Array2::from_shape_vec((rows, tl.seq), tl.gather.clone()).expect("rows x seq map"),
            scatter: Array1::from(tl.scatter.clone()),
            groups: [group(&tl.attention), group(&tl.ffn), group(&tl.methods), group(&tl.methods_ffn)],
        }
    }
}

/// `[rows, seq]` attention mask of the entering rows: each input row's own mask, zero past its end.
fn attention_mask(mask: &Array2<i64>, input_rows: &[usize], seq: usize) -> Array2<i64> {
    let mut m = Array2::zeros((input_rows.len(), seq));
    for (r, &i) in input_rows.iter().enumerate() {
        let n = seq.min(mask.ncols());
        m.slice_mut(s![r, ..n]).assign(&mask.slice(s![i, ..n]));
    }
    m
}

/// The first `lens[r]` positions of every row of `[rows, T, H]`, one after the other: `[tokens, H]`.
fn pack_rows(padded: ndarray::Array3<f32>, lens: &[usize]) -> Array2<f32> {
    let (rows, t, h) = padded.dim();
    if lens.iter().all(|&n| n == t) {
        return padded.into_shape_with_order((rows * t, h)).expect("a standard-layout array");
    }
    let mut out = Array2::zeros((lens.iter().sum(), h));
    let mut at = 0;
    for (r, &n) in lens.iter().enumerate() {
        out.slice_mut(s![at..at + n, ..]).assign(&padded.slice(s![r, ..n, ..]));
        at += n;
    }
    out
}

fn rank2(a: ArrayViewD<'_, f32>) -> Result<ArrayView2<'_, f32>, EngineError> {
    a.into_dimensionality::<Ix2>().map_err(|e| EngineError::Contract(format!("packed states are not rank 2: {e}")))
}

/// Each task's head once over all its lanes' rows (each row's real tokens of the packed states,
/// with its attention mask `masks[r]`).
fn heads(
    hidden: ArrayView2<'_, f32>,
    layout: &PackedPlan,
    real: &[usize],
    masks: &[&[i64]],
    lanes: &[Lane],
    groups: &[HeadGroup],
) -> Result<Vec<LaneOutput>, EngineError> {
    let mut out: Vec<Option<LaneOutput>> = vec![None; lanes.len()];
    for g in groups {
        let rows: Vec<ArrayView2<'_, f32>> = g
            .rows
            .iter()
            .map(|&r| {
                let start = layout.final_starts[r];
                hidden.slice(s![start..start + real[r], ..])
            })
            .collect();
        let row_masks: Vec<&[i64]> = g.rows.iter().map(|&r| masks[r]).collect();
        let mut results = run_task_head(&lanes[g.lanes[0]].task, &rows, &row_masks, HeadSource::HostFirst)?.into_iter();
        for &l in &g.lanes {
            out[l] = Some((&mut results).take(lanes[l].rows.len()).collect());
        }
    }
    Ok(out.into_iter().map(|o| o.expect("every lane is in a head group")).collect())
}

#[cfg(test)]
mod tests {
    use super::super::packing::pack;
    use super::super::plan::{BankIndex, LanePath, plan};

    fn lane(index: &[[BankIndex; 2]], rows: &[usize], head: usize) -> LanePath {
        LanePath { index: index.to_vec(), methods: Vec::new(), rows: rows.to_vec(), head, invertible: 0 }
    }

    /// The layer graph's one-group slot (tools/adapterdrop_tools/graphs_fast.py) decides by shapes
    /// alone: a slot whose maps are one group of as many tokens as enter must list them in order. The
    /// packing must keep that (and unpadded attention maps are the identity, for a reshape instead of
    /// attention's gathers).
    #[test]
    fn one_group_maps_of_every_token_are_in_order() {
        let lanes = [
            vec![lane(&[[0, 3]; 3], &[0, 1, 2], 0)],                                              // one task
            vec![lane(&[[0, 0]; 3], &[0, 1, 2], 0)],                                              // plain
            vec![lane(&[[0, 2], [0, 2], [4, 2]], &[0, 1, 2], 0), lane(&[[0, 5]; 3], &[1, 2], 1)], // split, then one group per part
            vec![lane(&[[0, 1]; 3], &[0], 0), lane(&[[0, 2]; 3], &[1], 1), lane(&[[0, 3]; 3], &[2], 2)], // distinct tasks
        ];
        let (mut one_group_slots, mut unpadded_attention) = (0, 0);
        for (c, lanes) in lanes.iter().enumerate() {
            let p = plan(lanes, 3, 3);
            for lens in [vec![4usize, 4, 4], vec![2, 5, 1]] {
                let layout = pack(&p, &lens, &lens);
                for (l, tl) in layout.layers.iter().enumerate() {
                    let identity = |v: &[i64]| v.iter().enumerate().all(|(i, &t)| t == i as i64);
                    let entering: usize = p.layers[l].input_rows.iter().map(|&r| lens[r]).sum();
                    for g in [&tl.attention, &tl.ffn] {
                        if g.groups() == 1 && g.width == g.ungroup.len() && g.ungroup.len() == g.group.len() {
                            assert!(identity(&g.group) && identity(&g.ungroup), "case {c}, layer {l}, lens {lens:?}");
                            one_group_slots += 1;
                        }
                    }
                    if tl.gather.len() == entering && tl.scatter.len() == entering {
                        assert!(identity(&tl.gather) && identity(&tl.scatter), "attention, case {c}, layer {l}");
                        unpadded_attention += 1;
                    }
                }
            }
        }
        // The cases above must reach both checks (one task, plain rows and split parts do).
        assert!(one_group_slots >= 8 && unpadded_attention >= 4, "{one_group_slots} one-group slots, {unpadded_attention} unpadded layers");
    }
}
