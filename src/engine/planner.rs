//! The engine planner (issue 12): each lane runs on the adapter banks when its task has bank rows,
//! else on the per-task segment path (fusion tasks, tasks without AdapterHub weights, backbones
//! without layer graphs, or `engine.banks = false`). A batch mixing both runs two passes, each over
//! only the input rows its lanes read, and the results are put back in lane order.

use super::banked::execute_banked;
use super::executor::{ExecStats, Lane, Sequence, execute};
use super::heads::LaneOutput;
use crate::error::EngineError;
use crate::repository::Backbone;
use crate::repository::manifest::HeadKind;

/// Whether a lane takes the bank path: its task has bank rows, and banks are on or the task has
/// nothing else to run on (weights-only); a built-in embedding task (no adapters: bank row 0 in
/// every layer) whenever banks are on, so it shares the trunk with the bank tasks.
pub fn on_banks(backbone: &Backbone, lane: &Lane, banks: bool) -> bool {
    task_on_banks(backbone, &lane.task, banks)
}

/// Whether a task's lanes take the bank path (see [`on_banks`]); the scheduler budgets by it.
pub fn task_on_banks(backbone: &Backbone, task: &crate::repository::Task, banks: bool) -> bool {
    let embedding = task.manifest.head.kind == HeadKind::Embedding;
    backbone.banked.is_some() && ((task.bank.is_some() && (banks || task.manifest.weights_only())) || (embedding && banks))
}

/// Runs every lane on its path; same result shape as [`execute`].
pub fn run_lanes(backbone: &Backbone, seqs: &[Sequence], lanes: &[Lane], banks: bool) -> Result<(Vec<LaneOutput>, ExecStats), EngineError> {
    let (bank, other): (Vec<usize>, Vec<usize>) = (0..lanes.len()).partition(|&l| on_banks(backbone, &lanes[l], banks));
    if other.is_empty() {
        return execute_banked(backbone, seqs, lanes);
    }
    if bank.is_empty() {
        return execute(backbone, seqs, lanes);
    }
    let mut logits: Vec<Option<LaneOutput>> = vec![None; lanes.len()];
    let mut stats = ExecStats::default();
    for (part, banked) in [(&bank, true), (&other, false)] {
        let (sub_seqs, sub_lanes) = subset(seqs, lanes, part);
        let (out, s) = if banked { execute_banked(backbone, &sub_seqs, &sub_lanes)? } else { execute(backbone, &sub_seqs, &sub_lanes)? };
        for (&l, o) in part.iter().zip(out) {
            logits[l] = Some(o);
        }
        merge(&mut stats, s, part, lanes.len());
    }
    Ok((logits.into_iter().map(|o| o.expect("every lane ran")).collect(), stats))
}

/// The sequences `part`'s lanes read, and those lanes with their rows renumbered.
fn subset(seqs: &[Sequence], lanes: &[Lane], part: &[usize]) -> (Vec<Sequence>, Vec<Lane>) {
    let mut new_row = vec![usize::MAX; seqs.len()];
    let mut sub_seqs = Vec::new();
    let sub_lanes = part
        .iter()
        .map(|&l| {
            let lane = &lanes[l];
            let rows = lane
                .rows
                .iter()
                .map(|&r| {
                    if new_row[r] == usize::MAX {
                        new_row[r] = sub_seqs.len();
                        sub_seqs.push(seqs[r].clone());
                    }
                    new_row[r]
                })
                .collect();
            Lane { task: lane.task.clone(), active: lane.active.clone(), rows }
        })
        .collect();
    (sub_seqs, sub_lanes)
}

fn merge(into: &mut ExecStats, s: ExecStats, part: &[usize], lanes: usize) {
    if into.layer_rows.len() < s.layer_rows.len() {
        into.layer_rows.resize(s.layer_rows.len(), 0);
    }
    for (a, b) in into.layer_rows.iter_mut().zip(&s.layer_rows) {
        *a += b;
    }
    into.adapter_rows += s.adapter_rows;
    into.padded_len = into.padded_len.max(s.padded_len);
    into.fusion_adapter_rows += s.fusion_adapter_rows;
    into.fusion_adapter_rows_saved += s.fusion_adapter_rows_saved;
    into.graph_runs += s.graph_runs;
    into.bank_lanes += s.bank_lanes;
    into.real_tokens += s.real_tokens;
    into.computed_tokens += s.computed_tokens;
    into.attention_tokens += s.attention_tokens;
    if !s.fusion.is_empty() {
        into.fusion.resize(lanes, Vec::new());
        for (&l, f) in part.iter().zip(s.fusion) {
            into.fusion[l] = f;
        }
    }
}
