//! The CPU runner of a bank plan (`plan.rs`): embeddings, then one `layer.onnx` run per layer with
//! the backbone's adapter banks as inputs, then the heads on the host. A batch costs 1 + L session
//! runs whatever tasks and drop depths it mixes (plus one per task whose head is only a graph).

use std::sync::Arc;

use ndarray::{Array1, ArrayView2, ArrayView3, Axis, s};
use ort::session::SessionInputValue;
use ort::value::TensorRef;

use super::executor::{ExecStats, Lane, Sequence, large_batch, pad};
use super::heads::{HeadSource, LaneOutput, run_task_head};
use super::plan::{HeadGroup, LanePath, plan};
use super::tensors::{i64_input, run_hidden};
use crate::error::EngineError;
use crate::repository::backbone::BANK_INPUTS;
use crate::repository::{Backbone, Location};

/// Runs `lanes` on the bank path; one output per lane, as `execute` returns.
pub fn execute_banked(backbone: &Backbone, seqs: &[Sequence], lanes: &[Lane]) -> Result<(Vec<LaneOutput>, ExecStats), EngineError> {
    let banked =
        backbone.banked.as_ref().ok_or_else(|| EngineError::Contract(format!("backbone `{}` has no layer graphs", backbone.name())))?;
    let runs = crate::runtime::session_runs();
    let store = banked.banks.store();
    let layers = backbone.num_layers();
    let paths: Vec<LanePath> = lanes
        .iter()
        .map(|lane| {
            let id = lane.task.bank.as_ref().map(|b| b.rows.id());
            let index = (0..layers)
                .map(|l| match id {
                    Some(id) if lane.active.0[l] => [store.index(id, l, Location::Attention), store.index(id, l, Location::Ffn)],
                    _ => [0, 0],
                })
                .collect();
            LanePath { index, rows: lane.rows.clone(), head: Arc::as_ptr(&lane.task) as usize }
        })
        .collect();
    let plan = plan(&paths, seqs.len(), layers);
    let (ids, types, mask) = pad(seqs, backbone.manifest.pad_token_id);
    let (iv, tv) = (ids.view(), types.view());
    let mut hidden = run_hidden(&backbone.embeddings, vec![("input_ids", i64_input(&iv)?), ("token_type_ids", i64_input(&tv)?)], "hidden")?;
    let mut stats =
        ExecStats { padded_len: ids.ncols(), layer_rows: plan.rows_per_layer.clone(), bank_lanes: lanes.len(), ..Default::default() };
    // A batch larger than the batch budget gives its memory back (as `execute` does): the last
    // layer run shrinks the arena, then the heap is trimmed.
    let most_rows = plan.rows_per_layer.iter().copied().chain([plan.final_rows]).max().unwrap_or(0);
    let large = large_batch(most_rows * ids.ncols());
    for (layer, lp) in plan.layers.iter().enumerate() {
        if large && layer + 1 == layers {
            crate::runtime::shrink_arena_after_next_run();
        }
        let identity = lp.input_rows.iter().enumerate().all(|(i, &r)| i == r) && lp.input_rows.len() == mask.nrows();
        let selected;
        let mv: ArrayView2<'_, i64> = if identity {
            mask.view()
        } else {
            selected = mask.select(Axis(0), &lp.input_rows);
            selected.view()
        };
        stats.count_padded_layer(seqs, lp.input_rows.iter().copied(), ids.ncols());
        stats.adapter_rows += lp.attention_index.iter().chain(&lp.ffn_index).filter(|&&i| i != 0).count();
        let maps = [&lp.attention_rows, &lp.attention_index, &lp.ffn_rows, &lp.ffn_index].map(|v| Array1::from(v.clone()));
        let mut inputs: Vec<(&'static str, SessionInputValue<'_>)> = vec![("hidden", hidden.input()?), ("attention_mask", i64_input(&mv)?)];
        for (name, v) in ["attention_rows", "attention_index", "ffn_rows", "ffn_index"].into_iter().zip(&maps) {
            inputs.push((name, TensorRef::from_array_view(v.view())?.into()));
        }
        for (names, location) in BANK_INPUTS.iter().zip([Location::Attention, Location::Ffn]) {
            let bank = store.bank(layer, location);
            for (name, t) in names.iter().zip([&bank.down_w, &bank.down_b, &bank.up_w, &bank.up_b, &bank.rule]) {
                inputs.push((name, TensorRef::from_array_view(t.view())?.into()));
            }
        }
        hidden = run_hidden(&banked.layers[layer], inputs, "y")?;
    }
    drop(store);
    // Heads read the states in place where they are host memory (CPU), else after one copy to the host.
    let host;
    let view = if hidden.view().is_ok() {
        hidden.view()?
    } else {
        host = hidden.into_host()?;
        host.view()
    };
    let lens: Vec<usize> = plan.final_inputs.iter().map(|&i| seqs[i].ids.len()).collect();
    let logits = heads(view, &lens, lanes, &plan.heads);
    if large {
        crate::runtime::trim_heap();
    }
    let logits = logits?;
    stats.graph_runs = (crate::runtime::session_runs() - runs) as usize;
    Ok((logits, stats))
}

/// Each task's head once over all its lanes' rows (each row's real tokens of `hidden`, `[R, T, H]`).
fn heads(hidden: ArrayView3<'_, f32>, lens: &[usize], lanes: &[Lane], groups: &[HeadGroup]) -> Result<Vec<LaneOutput>, EngineError> {
    let mut out: Vec<Option<LaneOutput>> = vec![None; lanes.len()];
    for g in groups {
        let rows: Vec<ArrayView2<'_, f32>> = g.rows.iter().map(|&r| hidden.slice(s![r, ..lens[r].max(1), ..])).collect();
        let mut results = run_task_head(&lanes[g.lanes[0]].task, &rows, HeadSource::HostFirst)?.into_iter();
        for &l in &g.lanes {
            out[l] = Some((&mut results).take(lanes[l].rows.len()).collect());
        }
    }
    Ok(out.into_iter().map(|o| o.expect("every lane is in a head group")).collect())
}
